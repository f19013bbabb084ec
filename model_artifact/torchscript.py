"""The artifact's model format, TorchScript: the one loader, and the saver the trainer exports with.

torch 2.13 marks `torch.jit` deprecated (it still works); TorchScript is the format our users
asked for, so that one warning is silenced here, where it is called, and nowhere else. Another
format would get a module of its own beside this one and a branch in `load_model`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from model_artifact.schema import ArtifactMetadata
from model_artifact.store import ArtifactError, read_metadata, verify_model_file


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch.jit is deprecated in torch 2.13 but is the artifact format our users asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


def load_model(version_dir: Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, ArtifactMetadata]:
    """Read metadata, verify the model file's checksum, and load it. The one loader."""
    metadata = read_metadata(version_dir)
    path = verify_model_file(version_dir, metadata)
    try:
        with quiet_torchscript():
            model = torch.jit.load(str(path), map_location=map_location)
    except Exception as exc:  # torch raises RuntimeError and friends for corrupt archives
        raise ArtifactError(f"{path}: cannot be loaded as TorchScript: {exc}") from exc
    model.eval()
    return model, metadata


def save_torchscript(module: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    """Script and freeze the module (BatchNorm folds into the convolutions) and save it.
    Tracing is the fallback for modules that scripting can't handle."""
    module = module.eval()
    with quiet_torchscript():
        try:
            scripted = torch.jit.script(module)
        except Exception:  # noqa: BLE001 - tracing is the documented fallback
            scripted = torch.jit.trace(module, example)
        frozen = torch.jit.freeze(scripted)
        torch.jit.save(frozen, str(path))
