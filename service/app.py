"""The app factory and its lifespan: load, verify and warm the model, run the batcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from model_artifact import ArtifactError
from service import __version__
from service.auth import TokenCheck, read_tokens, require_admin_token
from service.batcher import Batcher
from service.config import Settings
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, RequestMetricsMiddleware, SecurityHeadersMiddleware
from service.predictor import Predictor
from service.reload import Reloader, prepare_configured
from service.routes import admin, health, metrics, model, predict, v2
from service.state import ServingState

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

DESCRIPTION = """
Recognises handwritten digits with a CNN trained on MNIST.

* `POST /v1/predict`: pixel arrays (0..1, white digit on black, 28x28) as JSON.
* `POST /v1/predict/image`: PNG, JPEG, WebP, BMP or GIF uploads of any size; made MNIST-like first.
* `GET /v1/model`: what is being served. `GET /healthz`, `GET /readyz`: probes. `GET /metrics`: Prometheus.
* `/v2/...`: the Open Inference Protocol (KServe v2 REST), with the binary tensor data extension.

Concurrent requests share forward passes (dynamic batching). Every error is JSON:
`{"error": "<code>", "message": "<what went wrong>"}`.
"""


def create_app(
    settings: Settings | None = None,
    *,
    predictor: Predictor | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the app. Tests pass a small `predictor` and a fresh `registry`; otherwise the
    lifespan loads the artifact that `settings` names."""
    settings = settings or Settings()
    state = ServingState(
        settings=settings,
        metrics=Metrics(registry),
        api_auth=TokenCheck(read_tokens(settings.api_tokens, settings.api_tokens_file), "predictions"),
        admin_auth=TokenCheck(read_tokens(settings.admin_tokens, settings.admin_tokens_file), "admin"),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await _start(state, predictor)
        watcher = None
        if state.reloader is not None and settings.reload_interval_s > 0 and settings.model_version is None:
            watcher = asyncio.create_task(state.reloader.watch(settings.reload_interval_s), name="model-watcher")
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await _stop(state)

    # FastAPIOffline: the same FastAPI app, with /docs and /redoc served from bundled assets
    # instead of a public CDN, so the API documentation works on air-gapped deployments.
    app = FastAPIOffline(
        title="Digit recognition service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.serving = state
    install_error_handlers(app)
    for router in (predict.router, model.router, health.router, v2.router, admin.router):
        app.include_router(router)
    if settings.metrics_enabled:
        guard = [Depends(require_admin_token)] if settings.metrics_require_token else []
        app.include_router(metrics.router, dependencies=guard)
    if STATIC_DIR.is_dir():
        # The page's assets live under /static and the page itself is a route of its own: a
        # mount at "/" would swallow wrong-method API calls (404 instead of 405).
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def demo_page() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

    # Added last = outermost: metrics see every response, the 413s of the body limit included.
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
    )
    app.add_middleware(RequestMetricsMiddleware, state=state)
    app.add_middleware(SecurityHeadersMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization"],
            expose_headers=["X-Model-Version", "X-Batch-Size", "Server-Timing"],
        )
    return app


async def _start(state: ServingState, predictor: Predictor | None) -> None:
    settings = state.settings
    if predictor is None:
        # Load, verify, vet and warm the configured version; seconds of work off the event loop.
        try:
            predictor = await asyncio.to_thread(prepare_configured, settings)
        except ArtifactError as exc:
            # One clear line naming the file and the problem (uvicorn's traceback follows it).
            log.error("refusing to start: %s", exc)
            raise
        state.reloader = Reloader(state)
    else:
        await asyncio.to_thread(predictor.warm_up, settings.max_batch_size)
    batcher = Batcher(
        predictor,
        max_batch_size=settings.max_batch_size,
        max_batch_wait_s=settings.max_batch_wait_s,
        queue_limit=settings.queue_limit,
        observer=state.metrics,
        on_the_way=state.on_the_way,
    )
    await batcher.start()
    state.predictor, state.batcher = predictor, batcher
    state.metrics.serving(predictor.name, predictor.version)
    state.loaded = True
    log.info("ready: serving %s v%s on %s", predictor.name, predictor.version, predictor.device)


async def _stop(state: ServingState) -> None:
    state.shutting_down = True
    if state.batcher is not None:
        await state.batcher.stop(drain_timeout_s=state.settings.request_timeout_s)
    log.info("stopped")
