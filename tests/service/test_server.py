"""The uvicorn server the service runs in: what it does to the process once start-up is done."""

import asyncio
import gc
import logging
import os
import socket
import threading
import time

import pytest
import uvicorn

from service.server import GracefulServer
from tests.service.live import free_port


class _Lifecycle:
    draining = False


async def _app(scope: dict, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process must not keep the freeze


def _server() -> GracefulServer:
    config = uvicorn.Config(_app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="on")
    return GracefulServer(config, _Lifecycle(), shutdown_delay_s=0)  # type: ignore[arg-type]


def test_start_up_freezes_the_heap_so_full_collections_skip_it(unfrozen, caplog) -> None:
    assert gc.get_freeze_count() == 0
    server = _server()

    async def serve_until_started() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        server.should_exit = True
        await serving

    with caplog.at_level(logging.INFO, logger="service.server"):
        asyncio.run(serve_until_started())
    # Everything start-up made (here: the whole test process) is out of the collector's reach.
    assert gc.get_freeze_count() > 10_000
    assert any("start-up objects out of garbage collection" in r.getMessage() for r in caplog.records)


def test_a_burst_of_new_connections_is_taken_in_within_a_few_rounds_of_a_busy_loop() -> None:
    """libuv accepts one connection per listener per round; a busy round lasts long under load."""
    rounds = [0]

    async def busy_app(scope: dict, receive, send) -> None:
        if scope["type"] != "lifespan":
            return
        message = await receive()  # lifespan.startup
        busy = asyncio.create_task(_keep_busy(rounds))
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        busy.cancel()
        await send({"type": "lifespan.shutdown.complete"})
        assert message["type"] == "lifespan.startup"

    port = free_port()
    config = uvicorn.Config(busy_app, host="127.0.0.1", port=port, log_config=None, lifespan="on", loop="uvloop")
    server = GracefulServer(config, _Lifecycle(), shutdown_delay_s=0)  # type: ignore[arg-type]
    sockets_before = _open_sockets()
    serving = threading.Thread(target=server.run)  # uvicorn's own loop, as in production
    serving.start()
    clients: list[socket.socket] = []
    try:
        _wait_for(lambda: server.started)
        started_at = rounds[0]
        burst = 64
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(burst)]
        _wait_for(lambda: len(server.server_state.connections) >= burst)
        taken_in = rounds[0] - started_at
    finally:
        for client in clients:
            client.close()
        server.should_exit = True
        serving.join(timeout=10)
    # One accept per round would take at least 64 rounds; ACCEPTORS descriptors take 16 per round.
    assert taken_in <= burst // 4, taken_in
    assert _open_sockets() == sockets_before  # every descriptor of the listener closed


def _open_sockets() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:"):
            found.add(target)
    return found


async def _keep_busy(rounds: list[int]) -> None:
    while True:
        time.sleep(0.001)  # each round of the loop does some work, as under load
        rounds[0] += 1
        await asyncio.sleep(0)


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
