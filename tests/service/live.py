"""The real service as a process (`python -m service`, what the README and containers run),
on a free loopback port, for the tests that need real sockets, signals or uvicorn itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveService:
    port: int
    process: subprocess.Popen[str]
    output: str = field(default="")  # everything it printed, once it has stopped

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def running_service(env: dict[str, str] | None = None, args: list[str] | None = None) -> Iterator[LiveService]:
    """Start the service on the committed model, wait until /readyz says ready, stop it at the end.

    `args` are extra command-line flags (the port goes through DIGIT_PORT unless they set one);
    the output is captured and left in `.output` once the process has exited."""
    port = free_port()
    command = [sys.executable, "-m", "service", *(args or [])]
    if "--port" in command:
        port = int(command[command.index("--port") + 1])
    environment = {**os.environ, "DIGIT_PORT": str(port), **(env or {})}
    # Output goes to a file, not a pipe: a chatty server can never block on a full pipe.
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT, text=True)
        service = LiveService(port, process)
        try:
            try:
                wait_until_ready(service.base_url, process)
            except AssertionError:
                process.kill()
                process.wait(timeout=30)
                log.seek(0)
                raise AssertionError(f"the service did not become ready; it printed:\n{log.read()}") from None
            yield service
        finally:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=30)
            log.seek(0)
            service.output = log.read()


def wait_until_ready(base_url: str, process: subprocess.Popen | None = None, timeout_s: float = 60) -> None:
    """Poll /readyz until it answers 200; AssertionError if `process` exits or time runs out first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx2.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            raise AssertionError(f"{base_url} never became ready")
        time.sleep(0.2)
