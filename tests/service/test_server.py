"""The uvicorn server the service runs in: what it does to the process once start-up is done."""

import asyncio
import gc
import logging

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
