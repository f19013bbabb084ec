"""One error base class carrying its HTTP status, and the handlers that render every error as JSON."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="stable machine-readable code", examples=["invalid_input"])
    message: str = Field(description="what went wrong, for people", examples=["pixels: expected 784 values, got 783"])
    details: list[dict[str, Any]] | None = Field(None, description="per-field problems, when there are several")


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers
        self.details = details


class InvalidInput(ServiceError):
    status_code = 422
    code = "invalid_input"


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class Overloaded(ServiceError):
    status_code = 429
    code = "overloaded"


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = "unavailable"


class InferenceTimeout(ServiceError):
    status_code = 504
    code = "timeout"


class ModelFailure(ServiceError):
    status_code = 500
    code = "model_error"


def error_response(
    status_code: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body = ErrorBody(error=code, message=message, details=details).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status_code, headers=headers)


def describe_validation(errors: list[Any], limit: int = 20) -> tuple[str, list[dict[str, Any]]]:
    """One summary line and per-field details for pydantic's validation errors; the one formatter
    for /v1 bodies, query parameters and /v2 requests alike."""
    # For a union (rows or flat list) the branch that does not fit the input's shape only says
    # "should be a valid list"; the other branch names the real problem.
    errors = [e for e in errors if e.get("type") != "list_type"] or errors
    details = []
    for error in errors[:limit]:
        parts = [str(p) for p in error.get("loc", ()) if p != "body" and (isinstance(p, int) or str(p).isidentifier())]
        details.append({"field": ".".join(parts) or "body", "problem": error.get("msg", "invalid")})
    if not details:
        return "invalid request", []
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{details[0]['field']}: {details[0]['problem']}{more}", details


def render_error(request: Request, exc: Exception) -> JSONResponse:
    """The JSON answer to any error raised while handling `request`: the one renderer, used by the
    app's exception handlers and by the edge for the prediction routes it serves directly."""
    if isinstance(exc, ServiceError):
        return error_response(exc.status_code, exc.code, exc.message, headers=exc.headers, details=exc.details)
    if isinstance(exc, RequestValidationError):
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "request body is not valid JSON")
        if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
            return error_response(400, "empty_body", "request body is empty; send a JSON object")
        message, details = describe_validation(errors)
        return error_response(422, "invalid_input", message, details=details)
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))
    # Never leak a stack trace or a file path to the client; the log has the details.
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return render_error(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    for kind in (ServiceError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _handle)
