"""Pure ASGI middleware (no per-request task or body buffering): body-size limit, request IDs,
the access log and request metrics, and security headers."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, ServiceError, error_response
from service.metrics import Metrics
from service.pipeline import Pipeline

access_log = logging.getLogger("service.access")

# Probes and scrapes stay out of request metrics and the access log: they would drown the rest.
UNOBSERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:/+=@-]{1,128}$")  # safe to echo and to log as is


class _BodyTooLarge(PayloadTooLarge):
    """Raised from `receive`; the app's error handler renders it as a 413."""


class _BodyTooSlow(ServiceError):
    """Raised from `receive` when the body has not arrived in time; rendered as a 408."""

    status_code = 408
    code = "request_timeout"


class BodyLimitMiddleware:
    """Refuse bodies over the limit with 413 before they are read into memory (by the
    Content-Length header when there is one, else as the bytes arrive), and bodies that
    trickle in slower than `body_timeout_s` with 408, so slow clients cannot hold workers."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
        response_started = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        body_done = False

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

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than {self.max_body_bytes} bytes"
        await error_response(413, "payload_too_large", message, headers={"Connection": "close"})(scope, receive, send)


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


# The prediction routes' templates, for requests answered before routing.
_PREDICTION_ROUTES = (
    (re.compile(r"^/v1/predict$"), "/v1/predict"),
    (re.compile(r"^/v1/predict/image$"), "/v1/predict/image"),
    (re.compile(r"^/v2/models/[^/]+/infer$"), "/v2/models/{name}/infer"),
    (re.compile(r"^/v2/models/[^/]+/versions/[^/]+/infer$"), "/v2/models/{name}/versions/{version}/infer"),
)


def _seconds(raw: bytes) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0 < value < float("inf") else None


class SheddingMiddleware:
    """Refuse prediction requests that the queue would refuse anyway (429, or 503 when not serving)
    before anything else runs: no routing, no dependencies, no body, no access-log line. Under
    overload most requests take this path, so it must cost far less than an answer, or refusing
    would crowd out serving. A refusal still carries its request ID and the security headers, and
    is counted in the request metrics (the rejection counter says why). Admitted requests are
    checked again, with their real image count, when they are queued."""

    def __init__(self, app: ASGIApp, pipeline: Pipeline, metrics: Metrics) -> None:
        self.app = app
        self.pipeline = pipeline
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            template = next((t for pattern, t in _PREDICTION_ROUTES if pattern.match(path)), None)
            if template is not None:
                started = time.perf_counter()
                raw = next((value for name, value in scope["headers"] if name == b"x-request-timeout"), None)
                try:
                    # An unreadable deadline header is left to the route, which answers 400 naming it.
                    self.pipeline.admit(None if raw is None else _seconds(raw))
                except ServiceError as exc:
                    await self._refuse(exc, scope, protocol=path.startswith("/v2/"), send=send)
                    self.metrics.requests.labels(route=template, method="POST", status=str(exc.status_code)).inc()
                    self.metrics.request_latency.labels(route=template).observe(time.perf_counter() - started)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(exc: ServiceError, scope: Scope, *, protocol: bool, send: Send) -> None:
        payload = {"error": exc.message} if protocol else {"error": exc.code, "message": exc.message}
        body = json.dumps(payload).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id(scope)),
            *_SECURITY_HEADERS,
            *_PAGE_HEADERS,
        ]
        headers += [(name.lower().encode(), value.encode()) for name, value in (exc.headers or {}).items()]
        await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def request_id(scope: Scope) -> bytes:
    """The client's `X-Request-ID` when it is sane (safe to echo and to log), else a new one."""
    given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
    return given if _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex.encode()


class ObservingMiddleware:
    """Give every request an ID (the client's `X-Request-ID` when it is sane, else a new one) and echo
    it; count and time requests by route template and status; write one access-log line each."""

    def __init__(self, app: ASGIApp, metrics: Metrics, worker: int = 1) -> None:
        self.app = app
        self.metrics = metrics
        self.worker = worker  # which worker process answered, for the access log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        rid = request_id(scope)
        observed = path not in UNOBSERVED_PATHS
        status = 500
        started = time.perf_counter()

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        if not observed:
            await self.app(scope, receive, observing_send)
            return
        metrics = self.metrics
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observing_send)
        finally:
            metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
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
                    path,
                    "?" + query.decode("latin-1") if query else "",
                    status,
                    1000 * elapsed,
                    rid.decode(),
                    self.worker,
                )


class SecurityHeadersMiddleware:
    """nosniff and no-referrer on every response; a strict CSP everywhere but the docs pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = _SECURITY_HEADERS if scope.get("path", "").startswith(_DOC_PATHS) else _SECURITY_HEADERS + _PAGE_HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
