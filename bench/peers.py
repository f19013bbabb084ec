"""The three servers the benchmark compares, each started on free loopback ports and stopped on exit."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import torchserve
from bench.procs import HOST, ServerProcess, free_port, http_status

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0  # the JVM, model loading and warm-up on 2 busy cores

TORCHSERVE = "TorchServe"
HANDWRITTEN = "hand-written FastAPI"
SERVICE = "this service"
NAMES = {"torchserve": TORCHSERVE, "handwritten": HANDWRITTEN, "service": SERVICE}


@dataclass
class Peer:
    name: str
    png_url: str  # where a raw 28x28 PNG body is posted
    process: ServerProcess
    json_url: str | None = None  # where `{"pixels": ...}` and `{"instances": ...}` go (this service only)


def post(url: str, body: bytes, content_type: str, attempts: int = 5) -> bytes:
    """POST `body` and return the answer's body. Asked right after an overload cell, a server may still be
    working off its backlog and refuse with 429 or 503: that is waited out as `Retry-After` says, like any
    well-behaved client, a few times at most."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    for _ in range(attempts - 1):
        try:
            return _read(request)
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code not in (429, 503):
                    raise
                wait_s = _retry_after_s(exc.headers.get("Retry-After"))
            time.sleep(wait_s)
    return _read(request)


def _read(request: urllib.request.Request) -> bytes:
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def _retry_after_s(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.0), 5.0)
    except ValueError:  # the HTTP-date form
        return 1.0


def predicted_digit(url: str, png: bytes) -> int:
    """The digit a server answers for one PNG: a correctness check before any load."""
    return int(json.loads(post(url, png, "image/png"))["digit"])


@contextmanager
def _running(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def start_torchserve(model_dir: Path, work: Path) -> Iterator[Peer]:
    work = work / "torchserve"
    store = work / "model-store"
    version = torchserve.build_archive(model_dir, store, work)
    config = torchserve.write_config(work, store, version)
    # The workers' Unix socket paths must fit in 108 bytes: a temp directory of its own, short whatever TMPDIR is.
    with tempfile.TemporaryDirectory(prefix="ts-", dir="/tmp") as sockets:
        env = torchserve.environment(dict(os.environ), work, Path(sockets))
        command = torchserve.command(config, store)
        server = ServerProcess(TORCHSERVE, command, env, cwd=work, log_path=work / "output.log")
        with _running(server):
            server.wait_until(lambda: torchserve.workers_ready(config), START_TIMEOUT_S)
            yield Peer(TORCHSERVE, config.predict_url, server)


@contextmanager
def start_handwritten(model_dir: Path, work: Path) -> Iterator[Peer]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.handwritten:app", "--host", HOST, "--port", str(port)]
    env = {**os.environ, "BENCH_MODEL_DIR": str(model_dir)}
    server = ServerProcess(HANDWRITTEN, command, env, cwd=REPO, log_path=work / "handwritten.log")
    base = f"http://{HOST}:{port}"
    with _running(server):
        server.wait_until(lambda: http_status(f"{base}/docs") == 200, START_TIMEOUT_S)
        yield Peer(HANDWRITTEN, f"{base}/predict/image", server)


@contextmanager
def start_service(model_version: int, work: Path, extra_env: dict[str, str], extra_args: list[str]) -> Iterator[Peer]:
    """`python -m service` with its default settings: only the port, the host and the model version are set
    here; `extra_env` and `extra_args` change the rest (for a process model the service may grow)."""
    port = free_port()
    env = {
        **os.environ,
        "DIGIT_HOST": HOST,
        "DIGIT_PORT": str(port),
        "DIGIT_MODEL_VERSION": str(model_version),
        **extra_env,
    }
    command = [sys.executable, "-m", "service", *extra_args]
    server = ServerProcess(SERVICE, command, env, cwd=REPO, log_path=work / "service.log")
    base = f"http://{HOST}:{port}"
    with _running(server):
        server.wait_until(lambda: http_status(f"{base}/readyz") == 200, START_TIMEOUT_S)
        yield Peer(SERVICE, f"{base}/v1/predict/image", server, f"{base}/v1/predict")
