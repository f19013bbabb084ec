"""The real server under a short burst far beyond its capacity: it sheds load and recovers.

A small version of scripts/overload.py (loopback only, every phase bounded in time and requests).
Machines are noisy, so it asserts what must hold whatever their speed, and ratios with generous bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from scripts.bench import Server
from scripts.overload import Phase, digit_requests, run_phase

CLIENTS = 4
BURST_CLIENTS = 128  # 4x the queue: most of the burst cannot even be queued
SERVER_ENV = {
    "DIGIT_QUEUE_LIMIT": "32",
    "DIGIT_MAX_INSTANCES": "32",
    "DIGIT_MAX_FILES": "16",
    "DIGIT_REQUEST_TIMEOUT_S": "2",
    "DIGIT_LOG_LEVEL": "error",
}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    server = Server(max_batch_size=16, extra_env=SERVER_ENV)
    try:
        yield server
    finally:
        server.stop()


def phase(server: Server, name: str, clients: int, seconds: float) -> Phase:
    return asyncio.run(run_phase(server.port, digit_requests(16), name, clients, seconds, max_requests=20_000))


def test_a_burst_far_beyond_capacity_is_shed_with_fast_429s_and_the_server_recovers(server: Server) -> None:
    phase(server, "warm-up", CLIENTS, 0.5)
    baseline = phase(server, "baseline", CLIENTS, 1.0)
    burst = phase(server, "burst", BURST_CLIENTS, 2.0)
    after = phase(server, "after", CLIENTS, 1.0)

    assert set(baseline.statuses) == {200}, baseline.summary()
    assert baseline.connection_errors == 0

    # Every request of the burst is answered: accepted, or refused with a JSON error. Nothing is dropped.
    assert burst.connection_errors == 0, burst.summary()
    assert set(burst.statuses) <= {200, 429, 503, 504}, burst.summary()
    assert burst.non_json_errors == 0, burst.summary()
    assert burst.statuses[200] > 0, burst.summary()
    assert burst.statuses[429] > 0, burst.summary()
    assert burst.missing_retry_after == 0, burst.summary()
    # Refusing is cheaper than serving: 429s do not wait for the model.
    assert burst.percentile(429, 50) < burst.percentile(200, 50), burst.summary()

    # Right after the burst, normal traffic is served at about the baseline's speed again.
    assert set(after.statuses) == {200}, after.summary()
    assert after.percentile(200, 50) < 5 * baseline.percentile(200, 50) + 20, (baseline.summary(), after.summary())
