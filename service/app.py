"""The app factory and its lifespan: load, verify and warm the model, run the batcher.

The collaborators, each in a module of its own:
    ModelRegistry (which model new requests get) -> Pipeline (decode, preprocess, batch, calibrate)
    -> Batcher (one forward pass for many requests) -> Predictor (the model on its device);
    Reloader installs vetted versions in the registry; Lifecycle answers the probes.

With several worker processes (`service.workers`), each runs one such app, and they share a
`WorkerBoard`: probes answer for all of them, and a reload in one makes every one look.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from model_artifact import ArtifactError
from service import __version__
from service.auth import AdminAuth, TokenCheck, read_tokens
from service.batcher import Batcher
from service.board import PUBLISH_EVERY_S, WorkerBoard, WorkerState
from service.config import Settings
from service.errors import install_error_handlers
from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.middleware import REQUEST_ID_HEADER, EdgeMiddleware
from service.model_registry import ModelRegistry
from service.pipeline import Pipeline
from service.predictor import Predictor
from service.reload import Reloader, prepare_configured
from service.routes import admin, health, model, predict, v2
from service.routes import metrics as metrics_route
from service.routes.http import TIMEOUT_HEADER
from service.routes.prediction_route import PredictionRoute

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

DESCRIPTION = """
Recognises handwritten digits with a CNN trained on MNIST.

* `POST /v1/predict`: pixel arrays (0..1, white digit on black, 28x28) as JSON.
* `POST /v1/predict/image`: PNG, JPEG, WebP, BMP or GIF uploads of any size; made MNIST-like first.
* `GET /v1/model`: what is being served. `GET /healthz`, `GET /readyz`: probes. `GET /metrics`: Prometheus.
* `/v2/...`: the Open Inference Protocol (KServe v2 REST), with the binary tensor data extension.

Concurrent requests share forward passes (dynamic batching). Every error is JSON:
`{"error": "<code>", "message": "<what went wrong>"}`. Every response carries an `X-Request-ID`
(the client's, or a new one).
"""


def create_app(
    settings: Settings | None = None,
    *,
    predictor: Predictor | None = None,
    batcher: Batcher | None = None,
    metrics_registry: CollectorRegistry | None = None,
    board: WorkerBoard | None = None,
    worker_index: int = 0,
    start_version: int | None = None,
) -> FastAPI:
    """Build the app. Tests pass a small `predictor` (and may pass a `batcher`) and a fresh
    `metrics_registry`; otherwise the lifespan loads the artifact that `settings` names. A worker
    process gets the service's shared `board` and its slot on it; a replacement worker starts on
    `start_version`, the one its siblings serve, and follows them from there."""
    settings = settings or Settings()
    metrics = Metrics(metrics_registry)
    batcher = batcher or Batcher(
        max_batch_size=settings.max_batch_size,
        max_batch_wait_s=settings.max_batch_wait_s,
        queue_limit=settings.queue_limit,
        max_queue_delay_s=settings.max_queue_delay_s,
        observer=metrics,
    )
    pipeline = Pipeline(batcher, metrics, request_timeout_s=settings.request_timeout_s)
    batcher.on_the_way = lambda: pipeline.on_the_way

    def installed(model: Predictor) -> None:
        batcher.expect_rate(model.full_batch_rate, model)  # until its own passes are timed
        metrics.serving(model.name, model.version)
        lifecycle.publish()  # at once: an admin reload waits for every worker's version

    models = ModelRegistry(on_install=installed)
    board = board or WorkerBoard(1)
    lifecycle = Lifecycle(models, batcher, board, worker_index)

    def reloaded(outcome: str) -> None:
        metrics.reloaded(outcome)
        if outcome == "reloaded":
            board.request_reload()  # the other workers follow

    reloader = (
        Reloader(settings, lambda: models.model, models.install, on_outcome=reloaded) if predictor is None else None
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        member = asyncio.create_task(_take_part(lifecycle, reloader), name="worker-board")
        lag = asyncio.create_task(pipeline.loop_lag.run(), name="loop-lag")
        watcher = None
        try:
            await _start(settings, models, batcher, predictor, start_version)
            if reloader is not None and settings.reload_interval_s > 0 and settings.model_version is None:
                watcher = asyncio.create_task(
                    reloader.watch(settings.reload_interval_s, paused=lambda: lifecycle.draining),
                    name="model-watcher",
                )
            yield
        finally:
            lifecycle.draining = True
            if watcher is not None:
                watcher.cancel()
            await batcher.stop(drain_timeout_s=settings.request_timeout_s)
            pipeline.close()
            member.cancel()
            lag.cancel()
            board.publish(worker_index, WorkerState.STOPPED, board.version(worker_index))
            log.info("stopped")

    # FastAPIOffline: the same FastAPI app, with /docs and /redoc served from bundled assets
    # instead of a public CDN, so the API documentation works on air-gapped deployments.
    app = FastAPIOffline(
        title="Digit recognition service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.models = models
    app.state.pipeline = pipeline
    app.state.lifecycle = lifecycle
    app.state.board = board
    app.state.reloader = reloader
    app.state.api_auth = TokenCheck(read_tokens(settings.api_tokens, settings.api_tokens_file), "predictions")
    app.state.admin_auth = TokenCheck(read_tokens(settings.admin_tokens, settings.admin_tokens_file), "admin")
    install_error_handlers(app)
    for router in (predict.router, model.router, health.router, v2.router, admin.router):
        app.include_router(router)
    if settings.metrics_enabled:
        app.include_router(metrics_route.router, dependencies=[AdminAuth] if settings.metrics_require_token else [])
    if STATIC_DIR.is_dir():
        # The page's assets live under /static and the page itself is a route of its own: a
        # mount at "/" would swallow wrong-method API calls (404 instead of 405).
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def demo_page() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

    # The edge is one layer for every request, outermost but for CORS (so browsers can read a 429).
    app.add_middleware(
        EdgeMiddleware,
        pipeline=pipeline,
        metrics=metrics,
        prediction_routes=[
            route
            for router in (predict.router, v2.router)
            for route in router.routes
            if isinstance(route, PredictionRoute)
        ],
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        refusal_pause_s=settings.refusal_pause_s,
        worker=worker_index + 1,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization", TIMEOUT_HEADER, REQUEST_ID_HEADER],
            expose_headers=[
                "X-Model-Version",
                "X-Batch-Size",
                "Server-Timing",
                "Retry-After",
                REQUEST_ID_HEADER,
                "Inference-Header-Content-Length",  # /v2 binary responses cannot be split without it
            ],
        )
    return app


async def _take_part(lifecycle: Lifecycle, reloader: Reloader | None) -> None:
    """Keep this worker's slot on the board current, and look for a new model version whenever
    another worker has switched (or an admin asked one to)."""
    board = lifecycle.board
    seen = board.reload_requests
    while True:
        lifecycle.publish()
        # A request that arrives while this worker is still loading waits until it can act on it.
        if board.reload_requests != seen and lifecycle.registry.model is not None and not lifecycle.draining:
            seen = board.reload_requests
            if reloader is not None:
                try:
                    await reloader.reload()
                except ArtifactError:
                    pass  # the reloader logged the refusal; the old model keeps serving here
                except Exception:
                    log.exception("following another worker's reload failed; still serving the old model")
        await asyncio.sleep(PUBLISH_EVERY_S)


async def _start(
    settings: Settings,
    models: ModelRegistry,
    batcher: Batcher,
    predictor: Predictor | None,
    start_version: int | None = None,
) -> None:
    if predictor is None:
        # Load, verify, vet and warm the configured version; seconds of work off the event loop.
        try:
            predictor = await asyncio.to_thread(prepare_configured, settings, start_version)
        except ArtifactError as exc:
            # One clear line naming the file and the problem (uvicorn's traceback follows it).
            log.error("refusing to start: %s", exc)
            raise
    else:
        await asyncio.to_thread(predictor.warm_up, settings.max_batch_size)
    if predictor.device.type == "cuda":
        batcher.let_in_rounds = 0  # the GPU's pass overlaps the event loop: holding the next one back idles it
    await batcher.start()
    models.install(predictor)
    log.info("ready: serving %s v%s on %s", predictor.name, predictor.version, predictor.device)
