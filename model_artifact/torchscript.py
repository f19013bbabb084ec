"""The artifact's model format, TorchScript: the one loader, and the saver the trainer exports with.

torch 2.13 marks `torch.jit` deprecated (it still works); TorchScript is the format our users
asked for, so that one warning is silenced here, where it is called, and nowhere else. Another
format would get a module of its own beside this one and a branch in `load_model`.

The metadata's `precision` says which numerics the model computes in, and its accuracy was
measured in them: `load_model` returns the model running in that precision, for the service,
the trainer's evaluation and the benchmark alike, so nobody changes numerics silently.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from model_artifact.schema import ArtifactMetadata, Precision
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
    return in_precision(model, metadata.precision), metadata


class Autocast(torch.nn.Module):
    """A float32 model run under autocast: convolutions and matrix products in `dtype` (with
    float32 accumulation), float32 logits out. bfloat16 keeps float32's range, so no scaling."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return self.model(x).float()


def in_precision(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """The float32 model file, computing in `precision`."""
    if precision == "float32":
        return model
    if precision == "bfloat16":
        return Autocast(model, torch.bfloat16).eval()
    raise ArtifactError(f"precision {precision!r} is not supported by this loader (float32, bfloat16)")


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
