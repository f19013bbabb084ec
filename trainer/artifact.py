"""The model artifact: `<root>/<name>/<version>/{model.pt, metadata.json}`.

This module is the contract between the trainer (which writes artifacts) and the service
(which reads them): the metadata schema, atomic versioned writing, checksum verification
and the one function that loads a model file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.data import sha256_file

SCHEMA_VERSION = 1
MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"
_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class ArtifactError(Exception):
    """An artifact is missing, unreadable, tampered with or inconsistent."""


class InputSpec(BaseModel):
    shape: list[int | None] = Field(default=[None, 1, 28, 28], description="None is the batch dimension")
    dtype: Literal["float32"] = "float32"
    range: tuple[float, float] = (0.0, 1.0)
    polarity: Literal["white-on-black"] = "white-on-black"
    layout: str = "NCHW; normalisation is applied inside the model"


class OutputSpec(BaseModel):
    shape: list[int | None] = Field(default=[None, 10])
    dtype: Literal["float32"] = "float32"
    kind: Literal["logits"] = "logits"


class EpochRecord(BaseModel):
    member: int = 0  # which network of an ensemble
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


class Evaluation(BaseModel):
    test_accuracy: float = Field(description="fraction correct on the official 10k test set")
    test_loss: float
    per_class_accuracy: list[float] = Field(min_length=10, max_length=10)
    confusion_matrix: list[list[int]] = Field(description="rows: true digit, columns: predicted digit")
    val_accuracy: float
    val_ece_before: float = Field(description="expected calibration error on validation, T=1")
    val_ece_after: float = Field(description="expected calibration error on validation, fitted T")


class ArtifactMetadata(BaseModel):
    """Everything needed to use, verify and reproduce a model artifact."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=_NAME_PATTERN)
    version: int = Field(ge=1)
    created_at: datetime
    torch_version: str
    format: Literal["torchscript"] = "torchscript"
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    parameters: int
    architecture: dict[str, Any]
    input: InputSpec = InputSpec()
    output: OutputSpec = OutputSpec()
    labels: list[str] = Field(default=[str(d) for d in range(10)], min_length=10, max_length=10)
    temperature: float = Field(gt=0, description="divide logits by this before softmax")
    evaluation: Evaluation
    training: dict[str, Any] = Field(description="config, seed, command, duration and history")
    history: list[EpochRecord] = []
    dataset_sha256: dict[str, str]
    git_commit: str | None = None


# --- loading ---------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch.jit is deprecated in torch 2.13 but is the artifact format our users asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


def read_metadata(version_dir: Path) -> ArtifactMetadata:
    path = version_dir / METADATA_FILE
    try:
        return ArtifactMetadata.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: missing") from exc
    except ValidationError as exc:
        raise ArtifactError(f"{path}: does not match the metadata schema: {exc}") from exc


def verify_model_file(version_dir: Path, metadata: ArtifactMetadata) -> Path:
    path = version_dir / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    actual = sha256_file(path)
    if actual != metadata.model_sha256:
        raise ArtifactError(f"{path}: SHA-256 mismatch (metadata says {metadata.model_sha256}, file is {actual})")
    return path


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


def list_versions(root: Path, name: str) -> list[int]:
    model_dir = Path(root) / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_version_dir(root: Path, name: str, version: int | None = None) -> Path:
    """The directory of `version`, or of the newest version when None."""
    versions = list_versions(root, name)
    if not versions:
        raise ArtifactError(f"no versions of model {name!r} under {root}")
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise ArtifactError(f"model {name!r} has no version {chosen} under {root} (have {versions})")
    return Path(root) / name / str(chosen)


def find_valid_version(root: Path, name: str) -> Path | None:
    """The newest version whose metadata validates and whose model file matches its checksum."""
    for version in reversed(list_versions(root, name)):
        version_dir = Path(root) / name / str(version)
        try:
            verify_model_file(version_dir, read_metadata(version_dir))
        except ArtifactError:
            continue
        return version_dir
    return None


# --- writing ---------------------------------------------------------------------------


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


def write_artifact(
    root: Path,
    name: str,
    write_model: Callable[[Path], None],
    build_metadata: Callable[[int, str], ArtifactMetadata],
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically publish a new version of `name` under `root`; returns its directory.

    Everything is written into a hidden temporary directory beside the versions, then
    renamed into place, so a reader sees either no new version or a complete one.
    `write_model(path)` writes model.pt; `build_metadata(version, sha256)` makes metadata;
    `verify(directory)` may check the written files and raise before anything is published.
    """
    if not re.match(_NAME_PATTERN, name):
        raise ArtifactError(f"invalid model name {name!r}")
    model_dir = Path(root) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=model_dir))
    # mkdtemp makes a private (0700) directory; a published version must be readable by a
    # service running as another user (a container's non-root user, say).
    tmp.chmod(0o755)
    try:
        write_model(tmp / MODEL_FILE)
        _fsync_file(tmp / MODEL_FILE)
        if verify is not None:
            verify(tmp)
        digest = sha256_file(tmp / MODEL_FILE)
        for _ in range(100):  # another writer may take the version we picked; pick again
            version = (list_versions(root, name) or [0])[-1] + 1
            metadata = build_metadata(version, digest)
            if metadata.version != version or metadata.model_sha256 != digest:
                raise ArtifactError("build_metadata must use the version and checksum it is given")
            _write_json_synced(tmp / METADATA_FILE, metadata.model_dump(mode="json"))
            _fsync_dir(tmp)
            target = model_dir / str(version)
            try:
                os.rename(tmp, target)  # fails if the target exists and is not empty
            except OSError:
                if target.exists():
                    continue
                raise
            _fsync_dir(model_dir)
            return target
        raise ArtifactError(f"could not claim a version number under {model_dir}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_json_synced(path: Path, payload: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utc_now() -> datetime:
    return datetime.now(UTC)
