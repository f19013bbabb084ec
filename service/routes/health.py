"""Probes: /healthz (liveness) and /readyz (readiness). Kept out of metrics and access logs."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.schemas import Health, ModelRef, Readiness
from service.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: a verified, warmed model is loaded and the batcher runs",
    responses={503: {"model": Readiness, "description": "loading, stopped or shutting down"}},
)
async def readyz(state: State) -> JSONResponse:
    if state.ready and state.predictor is not None:
        body = Readiness(status="ready", model=ModelRef(name=state.predictor.name, version=state.predictor.version))
        return JSONResponse(body.model_dump(exclude_none=True))
    detail = "shutting down" if state.shutting_down else "model not loaded or batcher not running"
    return JSONResponse(Readiness(status="not ready", detail=detail).model_dump(exclude_none=True), status_code=503)
