"""Benchmark this service against TorchServe and a hand-written FastAPI server, in one run, on loopback.

All three serve the same committed TorchScript model (the newest version, or --model-version) and get the
same 28x28 PNG of a real MNIST test digit, posted by Debian's wrk over keep-alive connections at each
concurrency (--concurrency, 10 s per cell by default, after a warm-up). This service also gets the PNG
with ?preprocess=false (decoded only: the work TorchServe's handler does), JSON pixels at 64 clients
and one client of 256-image `instances` requests, set against the raw model's images/s at
batch 64 measured in this process. Each server's whole process tree is sampled for memory while it runs.
Prints a Markdown table with the ratios and goals (also written to --out) and stops every server it
started, also on Ctrl-C or an error.

    python scripts/bench.py [--seconds 10] [--peers torchserve,handwritten,service] [--out bench-results.md]
    python scripts/bench.py --service-env DIGIT_MAX_BATCH_SIZE=32 --service-arg=--some-flag
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# First on the path, so that `bench` is the package at the root and not this file (scripts/ is sys.path[0]).
sys.path.insert(0, str(REPO))

from bench import install, peers, wrk  # noqa: E402
from bench.procs import RssSampler, free_port, tree_rss_kib  # noqa: E402
from bench.report import CAPACITY_CLIENTS, INSTANCES, JSON_PIXELS, PNG, PNG_DECODE_ONLY, Results, markdown  # noqa: E402
from model_artifact import load_model, resolve_version_dir  # noqa: E402
from trainer.data import load_mnist  # noqa: E402

MODEL_NAME = "mnist-cnn"
DIGIT_INDEX = 0  # which MNIST test digit every request carries


def payloads(directory: Path) -> tuple[dict[str, Path], int]:
    """The request bodies as files wrk reads, and the digit's label."""
    test = load_mnist().test
    image, label = test.images[DIGIT_INDEX], int(test.labels[DIGIT_INDEX])
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    scaled = np.round(image.astype(np.float32) / 255, 3)
    instances = [np.round(img.astype(np.float32) / 255, 3).tolist() for img in test.images[:256]]
    bodies = {
        PNG: png.getvalue(),
        JSON_PIXELS: json.dumps({"pixels": scaled.tolist()}).encode(),
        INSTANCES: json.dumps({"instances": instances}).encode(),
    }
    paths = {}
    for n, (payload, body) in enumerate(bodies.items()):
        paths[payload] = directory / f"body-{n}.bin"
        paths[payload].write_bytes(body)
    return paths, label


def raw_model_rate(model_dir: Path, batch: int = 64, seconds: float = 3.0) -> float:
    """Images/s of the model alone, 2 threads (the machine's cores), no server running."""
    model, _ = load_model(model_dir)
    x = torch.rand(batch, 1, 28, 28)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            for _ in range(5):
                model(x)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model(x)
                n += 1
            return n * batch / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def versions(run_torchserve: bool) -> str:
    def first_line(command: list[str]) -> str:
        if shutil.which(command[0]) is None:
            return "not installed"
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}", first_line(["wrk", "-v"])]
    if run_torchserve:
        parts += [
            f"torchserve {importlib.metadata.version('torchserve')}",
            f"torch-model-archiver {importlib.metadata.version('torch-model-archiver')}",
            first_line(["java", "-version"]),
        ]
    return "; ".join(parts)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, bodies: dict[str, Path], results: Results) -> None:
        self.args, self.work, self.bodies, self.results = args, work, bodies, results
        types = {PNG: "image/png", JSON_PIXELS: "application/json", INSTANCES: "application/json"}
        self.scripts = {payload: wrk.write_script(work, path, types[payload]) for payload, path in bodies.items()}

    def cell(
        self, peer: peers.Peer, url: str, payload: str, clients: int, seconds: float | None = None, script: str = ""
    ) -> None:
        """One wrk run, recorded under `payload`; `script` names the body's script when another payload's."""
        with RssSampler(peer.process.pid) as sampler:
            result = wrk.run(
                url, self.scripts[script or payload], clients, seconds or self.args.seconds, self.args.wrk_timeout
            )
        result.peak_rss_kib = sampler.peak_kib
        self.results.cells[(peer.name, payload, clients)] = result
        print(
            f"  {peer.name}, {payload}, {clients} clients: {result.rps:,.0f} answers/s, {result.ok_rps:,.0f} 2xx/s, "
            f"p50 {result.latency_ms['p50']:.2f} ms, p99 {result.latency_ms['p99']:.1f} ms, statuses {result.statuses}, "
            f"socket errors {result.total_socket_errors}",
            flush=True,
        )

    def measure(self, peer: peers.Peer, label: int) -> None:
        png = self.bodies[PNG].read_bytes()
        for _ in range(5):  # one by one first: TorchScript profiles and optimises on its first calls
            digit = peers.predicted_digit(peer.png_url, png)
            if digit != label:
                raise RuntimeError(f"{peer.name} answered {digit} for a {label}: not the same model or input")
        # Warm-up (allocators, connection pools), not recorded; then one answer more, so that the first cell
        # starts on a server that has worked off the warm-up's backlog.
        wrk.run(peer.png_url, self.scripts[PNG], CAPACITY_CLIENTS, self.args.warmup, self.args.wrk_timeout)
        peers.predicted_digit(peer.png_url, png)
        self.results.idle_rss_kib[peer.name] = tree_rss_kib(peer.process.pid)
        for clients in self.args.concurrency:
            self.cell(peer, peer.png_url, PNG, clients)
        if peer.json_url:  # this service
            decode_only = f"{peer.png_url}?preprocess=false"
            if peers.predicted_digit(decode_only, png) != label:
                raise RuntimeError(f"{peer.name} without preprocessing did not answer {label}")
            self.cell(peer, decode_only, PNG_DECODE_ONLY, CAPACITY_CLIENTS, script=PNG)
            peers.post(peer.json_url, self.bodies[JSON_PIXELS].read_bytes(), "application/json")
            self.cell(peer, peer.json_url, JSON_PIXELS, CAPACITY_CLIENTS)
            peers.post(peer.json_url, self.bodies[INSTANCES].read_bytes(), "application/json")
            self.cell(peer, peer.json_url, INSTANCES, 1)

    def run(self, label: int, model_dir: Path, version: int) -> None:
        starters: dict[str, Callable[[], AbstractContextManager[peers.Peer]]] = {
            "torchserve": lambda: peers.start_torchserve(model_dir, self.work),
            "handwritten": lambda: peers.start_handwritten(model_dir, self.work),
            "service": lambda: peers.start_service(version, self.work, self.args.service_env, self.args.service_arg),
        }
        for key in self.args.peers:
            print(f"{peers.NAMES[key]}: starting", flush=True)
            with starters[key]() as peer:
                self.measure(peer, label)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per server, not recorded")
    parser.add_argument("--concurrency", default="1,64,512", help="client counts for the PNG cells (default 1,64,512)")
    parser.add_argument("--peers", default="torchserve,handwritten,service", help="which servers, in this order")
    parser.add_argument("--model-version", type=int, default=None, help="artifact version (default: the newest)")
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for this service"
    )
    parser.add_argument(
        "--service-arg", action="append", default=[], metavar="ARG", help="extra argument to `python -m service`"
    )
    parser.add_argument("--wrk-timeout", type=float, default=10.0, help="wrk's socket timeout, s (default 10)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results.md", help="write the Markdown here")
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing what is missing")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := set(args.peers) - set(peers.NAMES):
        parser.error(f"unknown peers {sorted(unknown)}; choose from {sorted(peers.NAMES)}")
    if bad := [item for item in args.service_env if "=" not in item]:
        parser.error(f"--service-env needs KEY=VALUE, got {bad}")
    args.service_env = dict(item.split("=", 1) for item in args.service_env)
    return args


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every server's `finally`


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    run_torchserve = "torchserve" in args.peers
    if args.no_install:
        if absent := install.missing(run_torchserve):
            raise SystemExit(f"missing: {' '.join(absent)}")
    else:
        install.ensure(run_torchserve)

    model_dir = resolve_version_dir(REPO / "artifacts", MODEL_NAME, args.model_version)
    version = int(model_dir.name)
    with tempfile.TemporaryDirectory(prefix="digit-bench-") as tmp:
        work = Path(tmp)
        bodies, label = payloads(work)
        started = datetime.now(UTC)
        results = Results(
            header={
                "run": f"{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores ({cpu_name()}), all servers and wrk on it",
                "model": f"{MODEL_NAME} version {version} (TorchScript), the same file for every server",
                "load": (
                    f"wrk, keep-alive, {args.seconds:g} s per cell after a {args.warmup:g} s warm-up per server, "
                    f"socket timeout {args.wrk_timeout:g} s, "
                    + (f"wrk at nice {wrk.PRIORITY}" if wrk.priority_raised() else "wrk at the servers' priority")
                    + f"; body: MNIST test digit {DIGIT_INDEX} (a {label})"
                ),
                "servers": (
                    "TorchServe: batch 32, max delay 5 ms, 2 workers x 1 thread, token auth off; "
                    "hand-written: FastAPI + uvicorn defaults, one forward pass per request; "
                    f"this service: `python -m service` defaults, env {args.service_env or 'none'}, "
                    f"args {args.service_arg or 'none'}"
                ),
                "versions": versions(run_torchserve),
            }
        )
        results.raw_images_per_s = raw_model_rate(model_dir, seconds=min(3.0, args.seconds))
        Bench(args, work, bodies, results).run(label, model_dir, version)
        results.header["took"] = f"{(datetime.now(UTC) - started).total_seconds():.0f} s"
    text = markdown(results)
    print("\n" + text)
    args.out.write_text(text, encoding="utf-8")
    return 0


# --- helpers scripts/overload.py and its test use: the service in-process-free, on a free port -------------


def http_request(path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


class Server:
    """`python -m service` on a free loopback port with the given largest batch, ready on return."""

    def __init__(self, max_batch_size: int, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "DIGIT_PORT": str(self.port),
            "DIGIT_MAX_BATCH_SIZE": str(max_batch_size),
            "DIGIT_QUEUE_LIMIT": "4096",
            "DIGIT_LOG_LEVEL": "warning",
            **(extra_env or {}),
        }
        self.process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
