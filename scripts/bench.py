"""Benchmark the real service on loopback and print a table.

Starts `python -m service` with batching on (max batch 64) and off (max batch 1), drives it
with keep-alive HTTP/1.1 clients at several concurrencies (bounded in time), and reports
throughput, p50/p99 latency and the mean batch size read from /metrics. Also measures the
raw model's images/s in this process, and 256-image `instances` requests against it.

    python scripts/bench.py [--seconds 4] [--out bench-results.md]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_artifact import load_model, resolve_version_dir  # noqa: E402
from trainer.data import load_mnist  # noqa: E402


@dataclass
class RunResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_request(path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def drive(port: int, requests: list[bytes], concurrency: int, seconds: float, warmup_s: float = 0.5) -> RunResult:
    """`concurrency` keep-alive connections, each sending the next request as soon as the last answered."""
    latencies: list[float] = []
    errors = 0
    count = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds

    async def client(offset: int) -> None:
        nonlocal errors, count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        try:
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                writer.write(requests[i % len(requests)])
                i += 1
                status = await read_response(reader)
                done = time.perf_counter()
                if sent >= measure_from:
                    count += 1
                    latencies.append(1000 * (done - sent))
                    if status != 200:
                        errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return RunResult(count, errors, seconds, latencies)


def scrape_batches(port: int) -> tuple[float, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("digit_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("digit_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


class Server:
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
        import urllib.request

        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def raw_model_rate(batch: int, seconds: float = 2.0) -> float:
    model, _ = load_model(resolve_version_dir(REPO / "artifacts", "mnist-cnn"))
    x = torch.rand(batch, 1, 28, 28)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += 1
    return n * batch / (time.perf_counter() - start)


def payloads(count: int = 200) -> dict[str, list[bytes]]:
    test = load_mnist().test
    json_requests, png_requests, big = [], [], []
    for image in test.images[:count]:
        pixels = np.round(image.astype(np.float32) / 255, 3).tolist()
        json_requests.append(http_request("/v1/predict", json.dumps({"pixels": pixels}).encode(), "application/json"))
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        png_requests.append(http_request("/v1/predict/image", buffer.getvalue(), "image/png"))
    instances = [np.round(img.astype(np.float32) / 255, 3).tolist() for img in test.images[:256]]
    big.append(http_request("/v1/predict", json.dumps({"instances": instances}).encode(), "application/json"))
    return {"json": json_requests, "png": png_requests, "instances256": big}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="extra server setting")
    parser.add_argument("--quick", action="store_true", help="JSON only, batching on only (for tuning)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    torch.set_num_threads(2)
    raw64, raw256 = raw_model_rate(64), raw_model_rate(256)
    bodies = payloads()
    rows: list[str] = []
    summary: dict[str, float] = {}
    extra_env = dict(item.split("=", 1) for item in args.server_env)
    modes = (("on (max 64)", 64),) if args.quick else (("on (max 64)", 64), ("off (max 1)", 1))
    endpoints = (
        (("/v1/predict JSON 28x28", "json"),)
        if args.quick
        else (("/v1/predict JSON 28x28", "json"), ("/v1/predict/image PNG 28x28", "png"))
    )
    for mode, max_batch in modes:
        server = Server(max_batch, extra_env)
        try:
            for endpoint, key in endpoints:
                for concurrency in levels:
                    before = scrape_batches(server.port)
                    result = asyncio.run(drive(server.port, bodies[key], concurrency, args.seconds))
                    after = scrape_batches(server.port)
                    mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    rows.append(
                        f"| {endpoint} | {mode} | {concurrency} | {result.throughput:,.0f} | "
                        f"{result.percentile(50):.2f} | {result.percentile(99):.2f} | {mean_batch:.1f} | {result.errors} |"
                    )
                    summary[f"{key}/{max_batch}/{concurrency}/rps"] = result.throughput
                    summary[f"{key}/{max_batch}/{concurrency}/p99"] = result.percentile(99)
                    print(rows[-1], flush=True)  # noqa: T201
            if max_batch == 64:
                big = asyncio.run(drive(server.port, bodies["instances256"], 1, args.seconds))
                big_rate = 256 * big.throughput
                summary["instances_rate"] = big_rate
        finally:
            server.stop()

    header = (
        "| endpoint | batching | clients | requests/s | p50 ms | p99 ms | mean batch | errors |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [header, *rows, ""]
    best_raw = max(raw64, raw256)
    lines.append(f"Raw model (same process, 2 threads): {raw64:,.0f} images/s at batch 64, {raw256:,.0f} at batch 256.")
    lines.append(
        f"256-image `instances` requests, one client: {summary['instances_rate']:,.0f} images/s "
        f"= {100 * summary['instances_rate'] / best_raw:.0f} % of the raw model's best."
    )
    for key, name in (("json", "JSON"), ("png", "PNG")):
        top = max(levels)
        if f"{key}/1/{top}/rps" not in summary:
            continue
        on, off = summary[f"{key}/64/{top}/rps"], summary[f"{key}/1/{top}/rps"]
        lines.append(
            f"{name} at {top} clients: batching gives {on / off:.2f}x the throughput of batching off; "
            f"p99 {summary[f'{key}/64/{top}/p99']:.1f} ms vs {summary[f'{key}/1/{top}/p99']:.1f} ms."
        )
    text = "\n".join(lines)
    print("\n" + text)  # noqa: T201
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
