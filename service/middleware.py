"""The service's edge: one pure ASGI middleware (no per-request task or body buffering) that every
HTTP request passes: shedding, the body limit, request IDs, security headers, request metrics and
the access log, and the direct path to the prediction routes."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    error_response,
    render_error,
)
from service.metrics import Metrics
from service.pipeline import Pipeline

access_log = logging.getLogger("service.access")

# Probes and scrapes stay out of request metrics and the access log: they would drown the rest.
UNOBSERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:/+=@-]{1,128}$")  # safe to echo and to log as is


class _BodyTooLarge(PayloadTooLarge):
    """Raised from `receive`; rendered as a 413 (by the app's error handler, or by the edge)."""


class _BodyTooSlow(ServiceError):
    """Raised from `receive` when the body has not arrived in time; rendered as a 408."""

    status_code = 408
    code = "request_timeout"


# The demo page may run only its own scripts and styles and talk only to this origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_PAGE_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
]
# FastAPI's own documentation pages load Swagger UI / ReDoc assets and an inline script.
_DOC_PATHS = ("/docs", "/redoc")


_ALL_HEADERS = _SECURITY_HEADERS + _PAGE_HEADERS


# New request IDs: 32 hex digits, this process's random half and a count. Unique across workers
# and restarts like a random UUID, without a system call for randomness on every request.
_ID_PREFIX = secrets.token_hex(8)
_id_count = itertools.count()


def _new_id_prefix() -> None:
    global _ID_PREFIX
    _ID_PREFIX = secrets.token_hex(8)  # a forked child must not repeat its parent's IDs


os.register_at_fork(after_in_child=_new_id_prefix)


def request_id(scope: Scope) -> bytes:
    """The client's `X-Request-ID` when it is sane (safe to echo and to log), else a new one."""
    given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
    return given if _VALID_REQUEST_ID.match(given) else f"{_ID_PREFIX}{next(_id_count):016x}".encode()


def _seconds(raw: bytes) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0 < value < float("inf") else None


@dataclass(frozen=True)
class _Target:
    """A prediction route, served straight from the edge."""

    route: APIRoute
    handler: Callable[[Request], Awaitable[Response]]


class EdgeMiddleware:
    """Every HTTP request passes here, in one layer: each layer of ASGI middleware costs every
    request a closure, a coroutine frame to resume and a copy of the headers, and under load the
    prediction routes pay for each (measured). In order:

    1. Shedding: a prediction request that the queue would refuse anyway (429, or 503 when not
       serving) is refused before anything else runs: no routing, no body, no access-log line.
       Under overload most requests take this path, so it must cost far less than an answer. A 429
       is sent after `refusal_pause_s`, which costs no CPU. The refusal still carries its request
       ID and the security headers and is counted (the rejection counter says why). Admitted
       requests are checked again, with their image count, when queued.
    2. Bodies over the limit are refused with 413 before they are read (by Content-Length, else as
       the bytes arrive), and bodies that trickle in slower than `body_timeout_s` get 408.
    3. Every response carries an `X-Request-ID` (the client's when sane, else a new one), nosniff
       and no-referrer, and a strict CSP everywhere but the docs pages.
    4. Requests are counted and timed by route template and status, and get one access-log line;
       probes and scrapes are left out of both.
    5. Prediction requests go straight to their route's handler, errors rendered as the app's
       handlers render them; everything else goes on to the app and its router."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        pipeline: Pipeline,
        metrics: Metrics,
        prediction_routes: Iterable[APIRoute],
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        refusal_pause_s: float = 0.0,
        worker: int = 1,
    ) -> None:
        self.app = app
        self.refusal_pause_s = refusal_pause_s
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.worker = worker  # which worker process answered, for the access log
        self._targets = [_Target(route, route.get_route_handler()) for route in prediction_routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        target: _Target | None = None
        if scope["method"] == "POST":
            for candidate in self._targets:
                matched = candidate.route.path_regex.match(path)
                if matched is not None:
                    target = candidate
                    scope["path_params"] = matched.groupdict()
                    scope["route"] = candidate.route
                    break
        rid = request_id(scope)
        if target is not None and await self._shed(scope, rid, target, send, started):
            return

        extra = [(b"x-request-id", rid), *(_SECURITY_HEADERS if path.startswith(_DOC_PATHS) else _ALL_HEADERS)]
        status = 500
        response_started = False

        async def edge_send(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        observed = path not in UNOBSERVED_PATHS
        if observed:
            self.metrics.in_flight.inc()
        try:
            await self._with_body_limit(target, scope, receive, edge_send, lambda: response_started)
        finally:
            if observed:
                self._observe(scope, target, status, rid, started)

    async def _shed(self, scope: Scope, rid: bytes, target: _Target, send: Send, started: float) -> bool:
        """Refuse now what the queue would refuse; True when refused."""
        raw = next((value for name, value in scope["headers"] if name == b"x-request-timeout"), None)
        try:
            # An unreadable deadline header is left to the route, which answers 400 naming it.
            self.pipeline.admit(None if raw is None else _seconds(raw))
        except ServiceError as exc:
            if isinstance(exc, Overloaded) and self.refusal_pause_s > 0:
                # Clients that retry at once (most load generators, many retry loops) would otherwise turn
                # refusals into the overload: a refusal costs far less than an answer, but not nothing.
                # The pause costs no CPU; it keeps the rate of refusals to what the clients' number allows.
                # Every 429 pauses, whatever deadline the client sent: a short one must not buy a way
                # around it (the client stops waiting on its own clock, which costs the service nothing).
                await asyncio.sleep(self.refusal_pause_s)
            protocol = scope["path"].startswith("/v2/")
            payload = {"error": exc.message} if protocol else {"error": exc.code, "message": exc.message}
            body = json.dumps(payload).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", rid),
                *_ALL_HEADERS,
            ]
            headers += [(name.lower().encode(), value.encode()) for name, value in (exc.headers or {}).items()]
            await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            template = target.route.path
            self.metrics.requests.labels(route=template, method="POST", status=str(exc.status_code)).inc()
            self.metrics.request_latency.labels(route=template).observe(time.perf_counter() - started)
            return True
        return False

    async def _with_body_limit(
        self, target: _Target | None, scope: Scope, receive: Receive, send: Send, response_started: Callable[[], bool]
    ) -> None:
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
                    return
                if declared > limit:
                    await self._too_large(scope, receive, send)
                    return
        received = 0
        body_done = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later receives only wait for a disconnect: no deadline
                return await receive()
            try:
                # asyncio.timeout_at arms one timer on this task; wait_for would spawn a task per
                # receive, which measurably slowed every request (and upset batching under load).
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTooSlow(f"the request body did not arrive within {self.body_timeout_s:g} s") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(f"request body is larger than {limit} bytes")
            return message

        try:
            if target is None:
                await self.app(scope, limited_receive, send)
            else:
                await _serve(target, scope, limited_receive, send)
        except _BodyTooLarge:
            if not response_started():
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than {self.max_body_bytes} bytes"
        await error_response(413, "payload_too_large", message, headers={"Connection": "close"})(scope, receive, send)

    def _observe(self, scope: Scope, target: _Target | None, status: int, rid: bytes, started: float) -> None:
        metrics = self.metrics
        metrics.in_flight.dec()
        elapsed = time.perf_counter() - started
        route = target.route if target is not None else scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        metrics.requests.labels(route=template, method=scope["method"], status=str(status)).inc()
        metrics.request_latency.labels(route=template).observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client") or ("-", 0)
            query = scope.get("query_string", b"")
            access_log.info(
                '%s "%s %s%s" %d %.1fms request_id=%s worker=%d',
                client[0],
                scope["method"],
                scope["path"],
                "?" + query.decode("latin-1") if query else "",
                status,
                1000 * elapsed,
                rid.decode(),
                self.worker,
            )


async def _serve(target: _Target, scope: Scope, receive: Receive, send: Send) -> None:
    """A prediction request, straight to its route's handler; errors rendered as the app renders them."""
    request = Request(scope, receive, send)
    try:
        response = await target.handler(request)
    except Exception as exc:  # noqa: BLE001 - every error becomes the app's JSON error, never a traceback
        response = render_error(request, exc)
    await response(scope, receive, send)
