"""uvicorn's server with a graceful shutdown that load balancers can see.

On SIGTERM (or SIGINT) the service starts draining at once: /readyz answers 503, while
requests that still arrive are served as usual. It keeps listening for `shutdown_delay_s`
so load balancers and probes notice and stop sending, then uvicorn stops accepting, lets
in-flight requests finish, and the lifespan drains the batcher. A second signal skips the
delay.

Once the app's start-up is done (model loaded, checked and warmed), and before the sockets
listen, the heap is frozen (`gc.freeze`): the hundreds of thousands of objects that torch, NumPy
and the web stack create at import live as long as the process, yet every full garbage
collection walked them all again. Under load that was a pause of 60-90 ms on the event loop
every 2-3 s in each worker, collecting nothing, and the tail latency of every request caught in
it. Frozen, they are skipped; what requests create is still collected as before.

Each listening socket is served through ACCEPTORS descriptors of it, so that a busy event loop
still takes in a burst of new connections within a few rounds (see ACCEPTORS).
"""

from __future__ import annotations

import gc
import logging
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.config import Settings
from service.lifecycle import Lifecycle
from service.sockets import address, bind_listener

log = logging.getLogger(__name__)

# libuv (under uvloop) accepts one connection per listener per round of the event loop. Under load a
# round takes tens of milliseconds, so a burst of new connections waited in the kernel's accept queue
# for up to a second and more, their first requests already sent. Each listening socket is served
# through this many descriptors of it, each accepting one per round (measured at 512 new connections
# under overload: p99 778 ms with one, 213 ms with 16; keep-alive and connection-per-request
# throughput no worse).
ACCEPTORS = 16


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_delay_s: float) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        lifecycle.listening = False  # ready only once the socket listens (see startup)
        self._delay_s = shutdown_delay_s
        self._pending: tuple[int, float] | None = None  # (signal, when to start the real exit)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._lifecycle.draining = True
        if self._delay_s <= 0 or self._pending is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        log.info("shutting down: readiness is off; still serving, closing the listener in %.1f s", self._delay_s)
        self._pending = (sig, time.monotonic() + self._delay_s)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn runs the app's start-up (the model loaded and warmed) first thing in its startup(), then
        # listens. The heap is frozen in between: collecting what start-up left takes tens of milliseconds,
        # which a worker joining live traffic would otherwise spend with new connections already waiting.
        start_app = self.lifespan.startup

        async def start_app_then_freeze() -> None:
            await start_app()
            if not self.lifespan.should_exit and not self.should_exit:
                frozen = freeze_startup_heap()
                log.info("froze %d start-up objects out of garbage collection", frozen)

        self.lifespan.startup = start_app_then_freeze  # type: ignore[method-assign]
        if sockets is None:
            # Bound before the app starts, so that a port another server listens on fails before the model loads.
            try:
                sockets = [bind_listener(self.config.host, self.config.port)]
            except OSError as exc:
                log.error("refusing to start: cannot bind %s: %s", self._address(), exc)
                raise SystemExit(3) from None
        listeners = sockets  # this process's alone (a worker's own socket, or bound just now)
        # Closing uvicorn's servers at shutdown closes every descriptor.
        acceptors = [sock.dup() for sock in listeners for _ in range(ACCEPTORS - 1)]
        try:
            await super().startup([*listeners, *acceptors])
        finally:
            if not self.started:  # start-up failed before the servers took the descriptors over
                for sock in [*listeners, *acceptors]:
                    sock.close()
        if not all(_listening(sock) for sock in listeners):
            # A bound socket listens only now; another server may have taken the port meanwhile, and
            # uvloop drops that error silently: a worker without a listener must not look ready.
            log.error("refusing to start: cannot listen on %s, the port is taken", self._address())
            for server in self.servers:
                server.close()
            await self.lifespan.shutdown()
            raise SystemExit(3)
        if self.started and not self.should_exit:
            self._lifecycle.listening = True
            self._lifecycle.publish()  # at once: the other workers' probes read the board
            log.info("listening on http://%s", self._address())

    def _address(self) -> str:
        return address(self.config.host, self.config.port)

    async def on_tick(self, counter: int) -> bool:
        if self._pending is not None and not self.should_exit and time.monotonic() >= self._pending[1]:
            super().handle_exit(self._pending[0], None)
        return await super().on_tick(counter)


def _listening(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:  # closed by the loop after a failed listen()
        return False


def freeze_startup_heap() -> int:
    """Collect what start-up left behind, then exempt every surviving object from future
    collections (they are freed by reference counting as ever). Returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def build_server(app: FastAPI, settings: Settings) -> GracefulServer:
    """uvicorn configured for the service: its own access log, and a drain as long as a request may take."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # the service writes its own, with request IDs and without probes
        # In-flight requests get their full timeout to finish once the listener has closed.
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    return GracefulServer(config, app.state.lifecycle, settings.shutdown_delay_s)
