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

from service import server as server_module
from service.server import GracefulServer, freeze_startup_heap
from tests.service.live import free_port


class _Lifecycle:
    """What the server reads and sets of the app's lifecycle; records what it publishes."""

    def __init__(self) -> None:
        self.draining = False
        self.listening = True
        self.published: list[bool] = []  # `listening` at each publish

    def publish(self) -> None:
        self.published.append(self.listening)


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


def test_the_heap_is_frozen_after_the_app_is_ready_and_before_the_port_takes_connections(unfrozen, monkeypatch) -> None:
    """Freezing collects what start-up left (tens of ms); done while listening, a worker joining live
    traffic would keep its first connections waiting that long."""
    port = free_port()
    app_ready: list[bool] = []
    seen: list[tuple[bool, bool]] = []  # at the freeze: (app started, port taking connections)
    lifecycle = _Lifecycle()

    async def app(scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await asyncio.sleep(0.05)  # loading
            assert not lifecycle.listening  # so the worker does not report ready yet
            app_ready.append(True)
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})

    def recording_freeze() -> int:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            accepting = True
        except ConnectionRefusedError:
            accepting = False
        seen.append((bool(app_ready), accepting))
        return freeze_startup_heap()

    monkeypatch.setattr(server_module, "freeze_startup_heap", recording_freeze)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on", loop="uvloop")
    server = GracefulServer(config, lifecycle, shutdown_delay_s=0)  # type: ignore[arg-type]
    serving = threading.Thread(target=server.run)
    serving.start()
    try:
        _wait_for(lambda: server.started)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # and now it listens
    finally:
        server.should_exit = True
        serving.join(timeout=10)
    assert seen == [(True, False)]
    assert lifecycle.published == [True]  # ready once it listens, and said so at once


def test_a_burst_of_new_connections_is_taken_in_within_a_few_rounds_of_a_busy_loop(unfrozen) -> None:
    """libuv accepts one connection per listener per round; a busy round lasts long under load."""
    loop_state = _BusyLoop()
    port = free_port()
    config = uvicorn.Config(
        loop_state.app, host="127.0.0.1", port=port, log_config=None, lifespan="on", loop="uvloop", interface="asgi3"
    )
    server = GracefulServer(config, _Lifecycle(), shutdown_delay_s=0)  # type: ignore[arg-type]
    sockets_before = _open_sockets()
    serving = threading.Thread(target=server.run)  # uvicorn's own loop, as in production
    serving.start()
    clients: list[socket.socket] = []
    burst = 64
    try:
        _wait_for(lambda: server.started)
        # Hold the loop while the clients connect, so that all of them wait in the accept queue at once.
        loop_state.hold.set()
        assert loop_state.held.wait(5)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(burst)]
        released_at = loop_state.rounds
        loop_state.release.set()
        _wait_for(lambda: len(server.server_state.connections) >= burst)
        taken_in = loop_state.rounds - released_at
    finally:
        loop_state.release.set()
        for client in clients:
            client.close()
        server.should_exit = True
        serving.join(timeout=10)
    # One accept per round would take at least 64 rounds; ACCEPTORS descriptors take 16 per round.
    assert taken_in <= burst // 4, taken_in
    assert _open_sockets() - sockets_before == set()  # every descriptor of the listener closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_port_taken_while_starting_stops_the_server_instead_of_leaving_it_ready_and_deaf(unfrozen) -> None:
    port = free_port()
    rival = socket.socket()

    async def app(scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            # Another server claims the port while this one is still loading (bound, not yet listening).
            rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rival.bind(("127.0.0.1", port))
            rival.listen()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on", loop="uvloop")
    lifecycle = _Lifecycle()
    server = GracefulServer(config, lifecycle, shutdown_delay_s=0)  # type: ignore[arg-type]
    exit_codes: list[object] = []

    def run() -> None:
        try:
            server.run()
        except SystemExit as stopped:
            exit_codes.append(stopped.code)

    serving = threading.Thread(target=run)
    serving.start()
    serving.join(timeout=10)
    still_serving = serving.is_alive()
    if still_serving:  # it started without a listener: stop it so that the test can fail cleanly
        server.should_exit = True
        serving.join(timeout=10)
    rival.close()
    assert not still_serving, "the server went on without a listener"
    assert exit_codes == [3]
    assert lifecycle.published == [] and not lifecycle.listening  # never reported ready


class _BusyLoop:
    """An app whose lifespan keeps the event loop busy, counting its rounds; `hold` blocks the loop."""

    def __init__(self) -> None:
        self.rounds = 0
        self.hold, self.held, self.release = threading.Event(), threading.Event(), threading.Event()

    async def app(self, scope: dict, receive, send) -> None:
        if scope["type"] != "lifespan":
            return
        await receive()  # lifespan.startup
        busy = asyncio.create_task(self._keep_busy())
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        busy.cancel()
        await send({"type": "lifespan.shutdown.complete"})

    async def _keep_busy(self) -> None:
        while True:
            time.sleep(0.001)  # each round of the loop does some work, as under load
            self.rounds += 1
            if self.hold.is_set() and not self.held.is_set():
                self.held.set()
                self.release.wait(10)
            await asyncio.sleep(0)


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


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
