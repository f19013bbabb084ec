"""Admin routes: POST /v1/admin/reload. Closed unless admin tokens are configured."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from model_artifact import ArtifactError
from service.auth import AdminAuth
from service.board import PUBLISH_EVERY_S, WorkerBoard
from service.errors import ErrorBody, ServiceError
from service.reload import Reloader

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminAuth])


class ReloadConflict(ServiceError):
    status_code = 409
    code = "reload_refused"


class ReloadResult(BaseModel):
    status: str = Field(examples=["reloaded"], description="reloaded, or unchanged when already serving the newest")
    previous_version: int
    serving_version: int
    workers: int = Field(description="worker processes of the service")
    workers_switched: int = Field(
        description="workers serving serving_version when this answer was sent (all of them: otherwise 409)"
    )


@router.post(
    "/reload",
    response_model=ReloadResult,
    summary="Switch to the newest model version without downtime",
    responses={
        401: {"model": ErrorBody, "description": "admin token missing or invalid"},
        403: {"model": ErrorBody, "description": "admin routes are disabled (no admin tokens configured)"},
        409: {
            "model": ErrorBody,
            "description": "the new version failed its checks (the old one keeps serving), "
            "or not every worker switched within the request timeout",
        },
    },
)
async def reload_model(request: Request) -> ReloadResult:
    """Load the newest version beside the serving one, verify its checksum, check a handful of known
    digits, warm it up, then switch; requests already under way finish on the old model. A version
    refused once is refused again at once until its files change."""
    reloader: Reloader | None = request.app.state.reloader
    if reloader is None:
        raise ReloadConflict("the service is not serving a model from artifacts")
    try:
        outcome = await reloader.reload()
    except ArtifactError as exc:
        raise ReloadConflict(str(exc)) from None
    board: WorkerBoard = request.app.state.board
    board.request_reload()  # the other workers look too, even if this one had already switched
    switched = await _switched(board, outcome.serving_version, request.app.state.settings.request_timeout_s)
    if switched < board.size:
        others = sorted({v for v in board.versions() if v != outcome.serving_version})
        raise ReloadConflict(
            f"only {switched} of {board.size} workers serve version {outcome.serving_version}; "
            f"the others still serve version {', '.join(map(str, others)) or '(none yet)'} (see their log)"
        )
    return ReloadResult(
        status=outcome.status,
        previous_version=outcome.previous_version,
        serving_version=outcome.serving_version,
        workers=board.size,
        workers_switched=switched,
    )


async def _switched(board: WorkerBoard, version: int, timeout_s: float) -> int:
    """Wait until every worker serves `version`; how many do."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (count := board.versions().count(version)) < board.size and loop.time() < deadline:
        await asyncio.sleep(PUBLISH_EVERY_S / 2)
    return count
