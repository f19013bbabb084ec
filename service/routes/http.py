"""What the prediction routes share on the HTTP side: the client's deadline header, the
content-type check, and the headers saying how a request was served."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.requests import Request

from service.errors import BadRequest, ErrorBody, UnsupportedMediaType
from service.pipeline import Outcome

TIMEOUT_HEADER = "X-Request-Timeout"  # seconds the client will wait; can only shorten the server's timeout
INLINE_BODY_BYTES = 64 * 1024  # bodies up to this are decoded on the event loop; bigger ones on a worker thread

COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "a bearer token is required (when tokens are configured)"},
    413: {"model": ErrorBody, "description": "body, image or image count over the limits"},
    415: {"model": ErrorBody, "description": "a content type this route does not read"},
    422: {"model": ErrorBody, "description": "input of the wrong shape, type or range"},
    429: {"model": ErrorBody, "description": "queue full, or the deadline cannot be met; see the Retry-After header"},
    500: {"model": ErrorBody, "description": "the model failed on this batch"},
    503: {"model": ErrorBody, "description": "not ready yet"},
    504: {"model": ErrorBody, "description": "no result within the request timeout"},
}


def header(request: Request, name: bytes) -> str | None:
    """One request header by its lower-case name, read straight from the ASGI scope: on the hot
    path this is several times cheaper than building Starlette's case-insensitive Headers."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def client_timeout(request: Request) -> float | None:
    """The client's own deadline from the X-Request-Timeout header, if it sent one."""
    raw = header(request, b"x-request-timeout")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise BadRequest(f"{TIMEOUT_HEADER} must be a number of seconds, got {raw[:40]!r}") from None
    if not 0 < seconds < float("inf"):
        raise BadRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw[:40]!r}")
    return seconds


def media_type(request: Request) -> str:
    return (header(request, b"content-type") or "").split(";")[0].strip().lower()


def require_media_type(request: Request, accepted: Iterable[str], *, json_suffix: bool = True) -> str:
    """415 unless the body's content type is one of `accepted` (or a +json type when allowed). A
    missing type is taken as accepted: non-browser clients often send none, while a cross-site
    browser form always names one (text/plain, form encodings), and those are refused."""
    kind = media_type(request)
    accepted = tuple(accepted)
    if not kind or kind in accepted or (json_suffix and kind.startswith("application/") and kind.endswith("+json")):
        return kind
    raise UnsupportedMediaType(f"content type {kind} is not supported here; send {' or '.join(accepted)}")


def served_headers(outcome: Outcome) -> dict[str, str]:
    """Which model version computed the answer, the batch it rode in, and where the time went."""
    timing = outcome.timing
    return {
        "X-Model-Version": str(outcome.model.version),
        "X-Batch-Size": str(timing.batch_size),
        "Server-Timing": (
            f"queue;dur={1000 * timing.queue_s:.3f}, preprocess;dur={1000 * timing.preprocess_s:.3f}, "
            f"inference;dur={1000 * timing.inference_s:.3f}"
        ),
    }
