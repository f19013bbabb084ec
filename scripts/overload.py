"""Overload the real service on loopback and report how it sheds load and recovers.

Starts `python -m service` on the committed model with a small queue and a short request timeout,
then runs three phases of keep-alive HTTP/1.1 clients sending 28x28 JSON requests back to back:

1. baseline: a few clients, well within capacity;
2. overload: many clients at once, far beyond capacity: counts 200s, 429s and anything else,
   times accepted and rejected requests separately, checks that every 429 carries Retry-After,
   and samples the server's resident memory;
3. recovery: the baseline's clients again, right after the overload stops.

Prints a markdown table (and writes it with the raw numbers as JSON with `--out`).

    python scripts/overload.py [--overload-clients 256] [--out overload.json]

Every phase is bounded in time and in requests, and only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procs import RssSampler, tree_rss_kib  # noqa: E402
from scripts.bench import Server, http_request  # noqa: E402

HOST = "127.0.0.1"
RESPONSE_TIMEOUT_S = 15.0  # one response, client side; the server's own timeout is much shorter
MAX_REQUESTS_PER_PHASE = 500_000  # a second bound on every phase, besides its duration

# A closed-loop client has at most one request queued, so 256 clients can never fill a queue of 256
# images: the queue limit is below the client count (and max_instances with it, which must not exceed it).
SERVER_ENV = {
    "DIGIT_QUEUE_LIMIT": "64",
    "DIGIT_MAX_INSTANCES": "64",
    "DIGIT_REQUEST_TIMEOUT_S": "2",
    "DIGIT_LOG_LEVEL": "error",
}


# --- requests ------------------------------------------------------------------------------------------------


def digit_requests(count: int = 64, seed: int = 0) -> list[bytes]:
    """`POST /v1/predict` requests with one 28x28 image each: strokes of light on black, like MNIST.
    Synthetic so that no data set has to be fetched; the model's cost does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        image = np.zeros((28, 28), dtype=np.float32)
        for _ in range(rng.integers(2, 5)):
            (r0, c0), (r1, c1) = rng.integers(5, 23, size=(2, 2))
            steps = max(abs(r1 - r0), abs(c1 - c0)) + 1
            rows = np.linspace(r0, r1, steps).round().astype(int)
            cols = np.linspace(c0, c1, steps).round().astype(int)
            for dr in (0, 1):
                image[np.clip(rows + dr, 0, 27), cols] = 1.0
        pixels = np.round(image, 3).tolist()
        requests.append(http_request("/v1/predict", json.dumps({"pixels": pixels}).encode(), "application/json"))
    return requests


# --- the client loop -----------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    clients: int
    seconds: float
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    latencies_ms: dict[int, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    connection_errors: int = 0
    missing_retry_after: int = 0
    non_json_errors: int = 0
    peak_rss_kib: int | None = None

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def rate(self, status: int | None = None) -> float:
        count = self.answered if status is None else self.statuses[status]
        return count / self.seconds

    def percentile(self, status: int, q: float) -> float:
        values = self.latencies_ms.get(status)
        return float(np.percentile(values, q)) if values else float("nan")

    def others(self) -> dict[int, int]:
        return {status: n for status, n in sorted(self.statuses.items()) if status not in (200, 429)}

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "answered": self.answered,
            "statuses": {str(status): n for status, n in sorted(self.statuses.items())},
            "rate_per_s": {str(status): self.rate(status) for status in sorted(self.statuses)},
            "latency_ms": {
                str(status): {"p50": self.percentile(status, 50), "p99": self.percentile(status, 99)}
                for status in sorted(self.latencies_ms)
            },
            "connection_errors": self.connection_errors,
            "429_without_retry_after": self.missing_retry_after,
            "errors_not_json": self.non_json_errors,
            "peak_rss_kib": self.peak_rss_kib,
        }


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bool, bytes]:
    """One response: (status, has Retry-After, server closes the connection, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, retry_after, close = 0, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"retry-after":
            retry_after = bool(value.strip())
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    body = await reader.readexactly(length)
    return status, retry_after, close, body


def is_json_error(body: bytes) -> bool:
    """Every error of the service is a JSON object with an `error` code."""
    try:
        return isinstance(json.loads(body).get("error"), str)
    except (ValueError, AttributeError):
        return False


async def run_phase(
    port: int,
    requests: list[bytes],
    name: str,
    clients: int,
    seconds: float,
    warmup_s: float = 0.0,
    max_requests: int = MAX_REQUESTS_PER_PHASE,
) -> Phase:
    """`clients` keep-alive connections, each sending its next request as soon as the last is answered,
    for `warmup_s` (not recorded) plus `seconds`, or until `max_requests` have been sent in all."""
    phase = Phase(name, clients, seconds)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds
    sent = 0

    async def client(offset: int) -> None:
        nonlocal sent
        writer: asyncio.StreamWriter | None = None
        i = offset
        try:
            while time.perf_counter() < stop_at and sent < max_requests:
                if writer is None:
                    try:
                        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), RESPONSE_TIMEOUT_S)
                    except (OSError, TimeoutError):
                        phase.connection_errors += 1
                        await asyncio.sleep(0.05)
                        continue
                began = time.perf_counter()
                sent += 1
                try:
                    writer.write(requests[i % len(requests)])
                    i += 1
                    response = await asyncio.wait_for(_read_response(reader), RESPONSE_TIMEOUT_S)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                    phase.connection_errors += 1
                    writer.close()
                    writer = None
                    continue
                done = time.perf_counter()
                status, retry_after, close, body = response
                if began >= measure_from:
                    phase.statuses[status] += 1
                    phase.latencies_ms[status].append(1000 * (done - began))
                    if status == 429 and not retry_after:
                        phase.missing_retry_after += 1
                    if status != 200 and not is_json_error(body):
                        phase.non_json_errors += 1
                if close:
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    # Requests still in flight when the time ran out finished afterwards: the rate is per measured second.
    return phase


# --- server memory -------------------------------------------------------------------------------------------


def read_status_kib(pid: int, key: str) -> int | None:
    """A `VmRSS`/`VmHWM`-style line of /proc/<pid>/status, in KiB; None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --- the run -------------------------------------------------------------------------------------------------


@dataclass
class Report:
    baseline: Phase
    overload: Phase
    recovery: Phase
    rss_after_warmup_kib: int | None
    hwm_kib: int | None
    server_env: dict[str, str]

    def table(self) -> str:
        def ms(value: float) -> str:
            return "–" if math.isnan(value) else f"{value:.1f}"  # NaN: no such responses

        lines = [
            "| phase | clients | s | answered/s | 200/s | 429/s | other statuses | conn. errors "
            "| 200 p50 ms | 200 p99 ms | 429 p50 ms | 429 p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for phase in (self.baseline, self.overload, self.recovery):
            others = ", ".join(f"{status}: {n}" for status, n in phase.others().items()) or "none"
            lines.append(
                f"| {phase.name} | {phase.clients} | {phase.seconds:g} | {phase.rate():,.0f} | {phase.rate(200):,.0f} "
                f"| {phase.rate(429):,.0f} | {others} | {phase.connection_errors} "
                f"| {ms(phase.percentile(200, 50))} | {ms(phase.percentile(200, 99))} "
                f"| {ms(phase.percentile(429, 50))} | {ms(phase.percentile(429, 99))} |"
            )
        base, over, rec = self.baseline, self.overload, self.recovery
        lines.append("")
        capacity = base.rate(200)
        lines.append(
            f"Overload: {over.clients} requests outstanding at all times, {over.clients / base.clients:.0f}x the "
            f"baseline's {base.clients}: at the baseline's p50 latency that is a demand of {self.demand():,.0f}/s, "
            f"{self.demand() / capacity:.0f}x the baseline's {capacity:,.0f}/s. Answered {over.rate():,.0f}/s "
            f"({over.rate() / capacity:.1f}x): {over.rate(200):,.0f}/s accepted ({over.rate(200) / capacity:.2f}x "
            f"the baseline) and {over.rate(429):,.0f}/s rejected with 429."
        )
        if over.statuses[429]:
            missing = over.missing_retry_after
            lines.append(
                f"Retry-After: on {over.statuses[429] - missing} of {over.statuses[429]} 429s. "
                f"429 p50 {ms(over.percentile(429, 50))} ms vs 200 p50 {ms(over.percentile(200, 50))} ms."
            )
        if self.rss_after_warmup_kib and over.peak_rss_kib:
            lines.append(
                f"Server RSS: {self.rss_after_warmup_kib / 1024:.0f} MiB after warm-up, peak "
                f"{over.peak_rss_kib / 1024:.0f} MiB during the overload "
                f"({over.peak_rss_kib / self.rss_after_warmup_kib:.2f}x), summed over the service's processes; "
                f"the supervisor's VmHWM at the end {(self.hwm_kib or 0) / 1024:.0f} MiB."
            )
        lines.append(
            f"Recovery: p50 {ms(rec.percentile(200, 50))} ms = {self.recovery_ratio(50):.2f}x the baseline's, "
            f"p99 {ms(rec.percentile(200, 99))} ms = {self.recovery_ratio(99):.2f}x; "
            f"throughput {rec.rate(200) / base.rate(200):.2f}x."
        )
        return "\n".join(lines)

    def demand(self) -> float:
        """Requests per second the overload's clients would send if the server answered at baseline speed."""
        return self.overload.clients / (self.baseline.percentile(200, 50) / 1000)

    def recovery_ratio(self, q: float) -> float:
        return self.recovery.percentile(200, q) / self.baseline.percentile(200, q)

    def as_json(self) -> dict[str, Any]:
        return {
            "server_env": self.server_env,
            "phases": {p.name: p.summary() for p in (self.baseline, self.overload, self.recovery)},
            "tree_rss_after_warmup_kib": self.rss_after_warmup_kib,
            "tree_peak_rss_during_overload_kib": self.overload.peak_rss_kib,
            "supervisor_vmhwm_kib": self.hwm_kib,  # the supervisor alone; the two above are process-tree sums
            "demand_at_baseline_latency_per_s": self.demand(),
            "recovery_ratio": {"p50": self.recovery_ratio(50), "p99": self.recovery_ratio(99)},
        }


def run(
    baseline_clients: int = 8,
    overload_clients: int = 256,
    baseline_s: float = 3.0,
    overload_s: float = 6.0,
    recovery_s: float = 3.0,
    server_env: dict[str, str] | None = None,
) -> Report:
    env = {"DIGIT_MAX_BATCH_SIZE": "64", **SERVER_ENV, **(server_env or {})}
    requests = digit_requests()
    server = Server(int(env["DIGIT_MAX_BATCH_SIZE"]), env)
    try:
        pid = server.process.pid
        # Warm up (first batches, allocator, connection set-up), then take the memory baseline.
        asyncio.run(run_phase(server.port, requests, "warm-up", baseline_clients, 1.0))
        rss_after_warmup = tree_rss_kib(pid)  # the supervisor and its workers, as the sampler counts
        baseline = asyncio.run(run_phase(server.port, requests, "baseline", baseline_clients, baseline_s, 0.2))
        with RssSampler(pid) as sampler:
            overload = asyncio.run(run_phase(server.port, requests, "overload", overload_clients, overload_s, 0.2))
        overload.peak_rss_kib = sampler.peak_kib
        recovery = asyncio.run(run_phase(server.port, requests, "recovery", baseline_clients, recovery_s))
        hwm = read_status_kib(pid, "VmHWM")
    finally:
        server.stop()
    return Report(baseline, overload, recovery, rss_after_warmup, hwm, env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-clients", type=int, default=8)
    parser.add_argument("--overload-clients", type=int, default=256)
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    parser.add_argument("--overload-seconds", type=float, default=6.0)
    parser.add_argument("--recovery-seconds", type=float, default=3.0)
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="extra server setting")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    args = parser.parse_args()
    report = run(
        args.baseline_clients,
        args.overload_clients,
        args.baseline_seconds,
        args.overload_seconds,
        args.recovery_seconds,
        dict(item.split("=", 1) for item in args.server_env),
    )
    text = report.table()
    print(text)  # noqa: T201
    if args.out:
        args.out.write_text(json.dumps({**report.as_json(), "table": text}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
