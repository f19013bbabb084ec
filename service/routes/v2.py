"""Open Inference Protocol (KServe v2) REST endpoints, on the same batcher and metrics as /v1."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.errors import ServiceError, ServiceUnavailable
from service.inference import admit_early, client_timeout, run_inference
from service.oip import HEADER_LENGTH, encode_infer_response, model_metadata, parse_infer_request, request_schema
from service.predictor import Predictor
from service.state import ServingState, State

SERVER_NAME = "digit-service"
EXTENSIONS = ["binary_tensor_data"]


class ModelNotFound(ServiceError):
    status_code = 404
    code = "not_found"


class ProtocolRoute(APIRoute):
    """Renders every error of these routes as the protocol's {"error": "..."} object."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status_code, headers=exc.headers)

        return protocol_handler


router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=ProtocolRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": 'bad request: {"error": "..."}'},
    404: {"description": 'unknown model or version: {"error": "..."}'},
}


def _model(state: ServingState, name: str, version: str | None) -> Predictor:
    if name != state.settings.model_name:
        raise ModelNotFound(f"unknown model '{name}'; this server serves '{state.settings.model_name}'")
    predictor = state.predictor
    if predictor is None:
        raise ServiceUnavailable(f"model '{name}' is not loaded yet", headers={"Retry-After": "1"})
    if version is not None and version != str(predictor.version):
        raise ModelNotFound(f"model '{name}' has no version '{version}'; serving version {predictor.version}")
    return predictor


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Server live (200 true, 4xx false)")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready", summary="Server ready (200 true, 4xx false)", responses={400: {"description": "not ready"}}
)
async def server_ready(state: State) -> JSONResponse:
    return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 400)


async def _metadata(state: ServingState, name: str, version: str | None) -> dict[str, Any]:
    predictor = _model(state, name, version)
    return model_metadata(predictor.name, predictor.version)


async def _ready(state: ServingState, name: str, version: str | None) -> JSONResponse:
    if name != state.settings.model_name:
        raise ModelNotFound(f"unknown model '{name}'; this server serves '{state.settings.model_name}'")
    ready = state.ready and (
        version is None or (state.predictor is not None and version == str(state.predictor.version))
    )
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)


async def _infer(request: Request, state: ServingState, name: str, version: str | None) -> Response:
    state.api_auth.verify(request.headers.get("authorization"))  # inline: cheaper than a dependency
    predictor = _model(state, name, version)
    admit_early(state, client_timeout(request.headers))  # before reading the body: shedding load stays cheap
    body = await request.body()
    parse_args = (body, request.headers.get(HEADER_LENGTH), state.settings.max_instances)
    # Big bodies are decoded off the event loop, so one large request does not stall the others.
    parsed = (
        await run_in_threadpool(parse_infer_request, *parse_args)
        if len(body) > 256 * 1024
        else parse_infer_request(*parse_args)
    )
    deadlines = [t for t in (parsed.timeout_s, client_timeout(request.headers)) if t is not None]
    served = await run_inference(state, torch.from_numpy(parsed.images), timeout_s=min(deadlines, default=None))
    tensors: dict[str, np.ndarray] = {
        "logits": served.logits.numpy(),
        "probabilities": served.probabilities.numpy(),
        "digit": served.digits.numpy().astype(np.int64),
    }
    body, content_headers = encode_infer_response(
        predictor.name, str(predictor.version), parsed.id, tensors, parsed.outputs
    )
    return Response(content=body, headers={**served.headers, **content_headers})


_INFER_DOC: dict[str, Any] = {
    "summary": "Inference: input FP32 [N,1,28,28] or [N,784] in 0..1, or UINT8 in 0..255",
    "description": (
        "Outputs `logits` and `probabilities` (FP32 [N,10]) and `digit` (INT64 [N]); honours `outputs` and `id`. "
        "Supports the binary tensor data extension (`Inference-Header-Content-Length`, `binary_data_size`, "
        "`binary_data`, `binary_data_output`) and a `timeout` parameter in microseconds."
    ),
    "responses": {
        200: {
            "description": "outputs as JSON, or (binary tensor data extension) a JSON header of "
            "`Inference-Header-Content-Length` bytes followed by the raw tensors",
            "content": {"application/json": {}, "application/octet-stream": {}},
        },
        **_ERRORS,
        401: {"description": 'bearer token missing or invalid: {"error": "..."}'},
        413: {"description": 'body over the size limit: {"error": "..."}'},
        429: {
            "description": 'queue full, or the expected wait exceeds the deadline; see Retry-After: {"error": "..."}'
        },
        500: {"description": 'the model failed on this batch: {"error": "..."}'},
        503: {"description": 'not ready, or shutting down: {"error": "..."}'},
        504: {"description": 'no result within the deadline: {"error": "..."}'},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": request_schema()}},
        }
    },
}


@router.get("/models/{name}", summary="Model metadata", responses=_ERRORS)
async def model_metadata_latest(name: str, state: State) -> dict[str, Any]:
    return await _metadata(state, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model metadata (versioned)", responses=_ERRORS)
async def model_metadata_versioned(name: str, version: str, state: State) -> dict[str, Any]:
    return await _metadata(state, name, version)


@router.get("/models/{name}/ready", summary="Model ready (200 true, 4xx false)", responses=_ERRORS)
async def model_ready_latest(name: str, state: State) -> JSONResponse:
    return await _ready(state, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model ready (versioned)", responses=_ERRORS)
async def model_ready_versioned(name: str, version: str, state: State) -> JSONResponse:
    return await _ready(state, name, version)


@router.post("/models/{name}/infer", **_INFER_DOC)
async def infer_latest(name: str, request: Request, state: State) -> Response:
    return await _infer(request, state, name, None)


@router.post("/models/{name}/versions/{version}/infer", **_INFER_DOC)
async def infer_versioned(name: str, version: str, request: Request, state: State) -> Response:
    return await _infer(request, state, name, version)
