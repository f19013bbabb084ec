"""Versioned artifact directories: find, verify and atomically publish `<root>/<name>/<version>/`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from model_artifact.schema import METADATA_FILE, MODEL_FILE, NAME_PATTERN, ArtifactMetadata


class ArtifactError(Exception):
    """An artifact is missing, unreadable, tampered with or inconsistent."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def check_servable(metadata: ArtifactMetadata, *, allow_smoke: bool = False) -> None:
    """Refuse an artifact that must not be served as a model: a --dry-run smoke test."""
    if metadata.smoke and not allow_smoke:
        raise ArtifactError(
            f"{metadata.name} version {metadata.version} is a --dry-run smoke test, not a trained model; "
            "refusing it (allow smoke artifacts explicitly to use it anyway)"
        )


def find_valid_version(root: Path, name: str, *, allow_smoke: bool = False) -> Path | None:
    """The newest version whose metadata validates, whose model file matches its checksum,
    and which is servable (smoke tests are skipped unless `allow_smoke`)."""
    for version in reversed(list_versions(root, name)):
        version_dir = Path(root) / name / str(version)
        try:
            metadata = read_metadata(version_dir)
            verify_model_file(version_dir, metadata)
            check_servable(metadata, allow_smoke=allow_smoke)
        except ArtifactError:
            continue
        return version_dir
    return None


def write_artifact(
    root: Path,
    name: str,
    write_model: Callable[[Path], None],
    build_metadata: Callable[[int, str], ArtifactMetadata],
    verify: Callable[[Path], None] | None = None,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically publish a new version of `name` under `root`; returns its directory.

    Everything is written into a hidden temporary directory beside the versions, then
    renamed into place, so a reader sees either no new version or a complete one.
    `write_model(path)` writes model.pt; `build_metadata(version, sha256)` makes metadata;
    `verify(directory)` may check the written files and raise before anything is published;
    `finish(directory)` may add files that need the metadata (a report) before publishing.
    """
    if not re.match(NAME_PATTERN, name):
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
            if finish is not None:
                finish(tmp)
                for path in tmp.iterdir():
                    _fsync_file(path)
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
