"""How the prediction routes are run: documented by FastAPI, served without its per-request machinery.

Every prediction request pays for what runs around it. FastAPI's dependency injection, query
parsing and response validation cost more per request than decoding the image (about 100 µs of
the hot path, measured under load), so these routes skip them. A `PredictionRoute` is declared
like any other route, and /docs shows its summary, body, responses and the `api_token` scheme;
at request time it checks the API token and calls the endpoint with the `Request` and the URL's
path parameters (as strings). The endpoint reads its own query parameters (`query_flag`, whose
names it also declares for the docs with `flag_parameter`) and returns its `Response`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request, Response, Security
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError

from service.auth import api_bearer, check_api_token
from service.config import Settings
from service.errors import InvalidInput
from service.model_registry import ModelRegistry
from service.pipeline import Pipeline
from service.predictor import Predictor

_BOOL = TypeAdapter(bool)  # FastAPI's own rules for a boolean query parameter: true/false, 1/0, yes/no, on/off


@dataclass(frozen=True)
class Serving:
    """What a prediction request works with: the model it resolved when it arrived, and the path to it."""

    model: Predictor
    pipeline: Pipeline
    settings: Settings


def serving(request: Request) -> Serving:
    """Resolve the model once for this request (503 before one is loaded)."""
    state = request.app.state
    registry: ModelRegistry = state.models
    return Serving(registry.current(), state.pipeline, state.settings)


class PredictionRoute(APIRoute):
    """A route whose endpoint takes `(request, **path_params)` and returns its Response. It runs no
    dependencies, so it declares none: the API token it documents, it checks itself."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if kwargs.get("dependencies"):
            raise TypeError(f"{path}: a PredictionRoute runs no dependencies; check inputs in the endpoint")
        if not inspect.iscoroutinefunction(endpoint):
            raise TypeError(f"{path}: a PredictionRoute's endpoint must be `async def` (it is awaited as is)")
        super().__init__(path, endpoint, **{**kwargs, "dependencies": [Security(api_bearer)]})

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            await check_api_token(request)
            return await endpoint(request, **request.path_params)

        return handle


def query_flag(request: Request, name: str) -> bool | None:
    """A boolean query parameter (None when absent; the last one when repeated), or 422 naming it."""
    query = request.scope["query_string"]
    if not query:
        return None
    raw = None
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == name:
            raw = value
    if raw is None:
        return None
    try:
        return _BOOL.validate_python(raw)
    except ValidationError:
        problem = f"expected a boolean (true or false), got {raw[:40]!r}"
        field = f"query.{name}"  # as FastAPI's validation named query parameters
        raise InvalidInput(f"{field}: {problem}", details=[{"field": field, "problem": problem}]) from None


def flag_parameter(name: str, description: str) -> dict[str, Any]:
    """The OpenAPI declaration of a `query_flag`."""
    return {"name": name, "in": "query", "required": False, "schema": {"type": "boolean"}, "description": description}
