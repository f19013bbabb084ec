"""Open Inference Protocol (KServe v2) REST endpoints: the /v2 codec over the shared pipeline."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from service import __version__
from service.codecs.oip import HEADER_LENGTH, encode_infer_response, model_metadata, parse_infer_request, request_schema
from service.deps import CurrentModel, LifecycleDep, RegistryDep, SettingsDep
from service.errors import ServiceError
from service.predictor import Predictor
from service.routes.http import INLINE_BODY_BYTES, client_timeout, require_media_type, served_headers
from service.routes.prediction_route import PredictionRoute, serving

SERVER_NAME = "digit-service"
EXTENSIONS = ["binary_tensor_data"]


class ModelNotFound(ServiceError):
    status_code = 404
    code = "not_found"


class ProtocolErrors(APIRoute):
    """Renders every error of these routes as the protocol's {"error": "..."} object."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status_code, headers=exc.headers)

        return protocol_handler


class InferRoute(ProtocolErrors, PredictionRoute):
    """The inference routes: the prediction routes' lean request path, with the protocol's errors."""


router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=ProtocolErrors)

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": 'bad request: {"error": "..."}'},
    404: {"description": 'unknown model or version: {"error": "..."}'},
}


def _check(model: Predictor, served_name: str, name: str, version: str | None) -> Predictor:
    """The request's model, if it is the one the URL names (checked against the model the request
    resolved, so a versioned URL is never computed by another version)."""
    if name != served_name:
        raise ModelNotFound(f"unknown model '{name}'; this server serves '{served_name}'")
    if version is not None and version != str(model.version):
        raise ModelNotFound(f"model '{name}' has no version '{version}'; serving version {model.version}")
    return model


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Server live (200 true, 4xx false)", responses={400: {"description": "not live"}})
async def server_live(lifecycle: LifecycleDep) -> JSONResponse:
    live = lifecycle.liveness() is None
    return JSONResponse({"live": live}, status_code=200 if live else 400)


@router.get(
    "/health/ready", summary="Server ready (200 true, 4xx false)", responses={400: {"description": "not ready"}}
)
async def server_ready(lifecycle: LifecycleDep) -> JSONResponse:
    ready = lifecycle.readiness() is None
    return JSONResponse({"ready": ready}, status_code=200 if ready else 400)


async def _metadata(model: Predictor, settings_name: str, name: str, version: str | None) -> dict[str, Any]:
    model = _check(model, settings_name, name, version)
    return model_metadata(model.name, model.version)


async def _ready(
    lifecycle: LifecycleDep, registry: RegistryDep, served_name: str, name: str, version: str | None
) -> JSONResponse:
    if name != served_name:
        raise ModelNotFound(f"unknown model '{name}'; this server serves '{served_name}'")
    model = registry.model
    ready = lifecycle.readiness() is None and (version is None or (model is not None and version == str(model.version)))
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    served = serving(request)
    pipeline, settings = served.pipeline, served.settings
    model = _check(served.model, settings.model_name, name, version)
    header_timeout_s = client_timeout(request)
    require_media_type(request, ["application/json", "application/octet-stream"])
    body = await request.body()
    header_length = request.headers.get(HEADER_LENGTH)
    decoded, outcome = await pipeline.run(
        model,
        lambda: parse_infer_request(body, header_length, settings.max_instances, header_timeout_s),
        offload=len(body) > INLINE_BODY_BYTES,  # one large request must not stall the others
    )
    body, content_headers = encode_infer_response(outcome, decoded)
    return Response(content=body, headers={**served_headers(outcome), **content_headers})


_INFER_DOC: dict[str, Any] = {
    "summary": "Inference: input FP32 [N,1,28,28] or [N,784] in 0..1, or UINT8 in 0..255",
    "description": (
        "Outputs `logits` and `probabilities` (FP32 [N,10]) and `digit` (INT64 [N]); honours `outputs` and `id`. "
        "An image with no digit (fewer than 3 pixels at 0.05 or brighter) gets `digit` -1 and zero rows. "
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
        415: {"description": 'a content type other than JSON or octet-stream: {"error": "..."}'},
        500: {"description": 'the model failed on this batch: {"error": "..."}'},
        503: {"description": 'not ready yet: {"error": "..."}'},
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
async def model_metadata_latest(name: str, model: CurrentModel, settings: SettingsDep) -> dict[str, Any]:
    return await _metadata(model, settings.model_name, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model metadata (versioned)", responses=_ERRORS)
async def model_metadata_versioned(
    name: str, version: str, model: CurrentModel, settings: SettingsDep
) -> dict[str, Any]:
    return await _metadata(model, settings.model_name, name, version)


@router.get("/models/{name}/ready", summary="Model ready (200 true, 4xx false)", responses=_ERRORS)
async def model_ready_latest(
    name: str, lifecycle: LifecycleDep, registry: RegistryDep, settings: SettingsDep
) -> JSONResponse:
    return await _ready(lifecycle, registry, settings.model_name, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model ready (versioned)", responses=_ERRORS)
async def model_ready_versioned(
    name: str, version: str, lifecycle: LifecycleDep, registry: RegistryDep, settings: SettingsDep
) -> JSONResponse:
    return await _ready(lifecycle, registry, settings.model_name, name, version)


async def infer_latest(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


async def infer_versioned(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


for _path, _endpoint in (
    ("/models/{name}/infer", infer_latest),
    ("/models/{name}/versions/{version}/infer", infer_versioned),
):
    router.add_api_route(_path, _endpoint, methods=["POST"], route_class_override=InferRoute, **_INFER_DOC)
