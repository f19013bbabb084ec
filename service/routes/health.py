"""Probes: /healthz (liveness) and /readyz (readiness). Kept out of metrics and access logs."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import LifecycleDep
from service.schemas import Health, ModelRef, Readiness

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    summary="Liveness: the process can make progress (restart it when this fails)",
    responses={503: {"model": Health, "description": "the batcher's collector died"}},
)
async def healthz(lifecycle: LifecycleDep) -> JSONResponse:
    problem = lifecycle.liveness()
    if problem is not None:
        return JSONResponse(Health(status="failing", detail=problem).model_dump(exclude_none=True), status_code=503)
    return JSONResponse(Health(status="ok").model_dump(exclude_none=True))


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: a verified, warmed model is loaded, the batcher runs, no shutdown has begun",
    responses={503: {"model": Readiness, "description": "loading, stopped or shutting down"}},
)
async def readyz(lifecycle: LifecycleDep) -> JSONResponse:
    problem = lifecycle.readiness()
    model = lifecycle.registry.model
    if problem is None and model is not None:
        body = Readiness(status="ready", model=ModelRef(name=model.name, version=model.version))
        return JSONResponse(body.model_dump(exclude_none=True))
    return JSONResponse(Readiness(status="not ready", detail=problem).model_dump(exclude_none=True), status_code=503)
