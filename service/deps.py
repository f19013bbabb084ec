"""The collaborators routes may ask for, declared once as `Annotated` dependencies.

The app factory puts them on `app.state`; a route names what it needs and nothing more.
A prediction route asks for `Serving`: the caller checked and the model resolved, once,
in one dependency (each dependency costs FastAPI work on every request of the hot path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.auth import Credentials, api_bearer, check_api_token
from service.config import Settings
from service.lifecycle import Lifecycle
from service.model_registry import ModelRegistry
from service.pipeline import Pipeline
from service.predictor import Predictor

# async on purpose: FastAPI runs plain-def dependencies on a thread pool, a thread hop per request.


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


async def _registry(request: Request) -> ModelRegistry:
    return request.app.state.models


async def _current_model(request: Request) -> Predictor:
    registry: ModelRegistry = request.app.state.models
    return registry.current()


@dataclass(frozen=True)
class Serving:
    """What a prediction request works with: the model it resolved when it arrived, and the path to it."""

    model: Predictor
    pipeline: Pipeline
    settings: Settings


async def _serving(request: Request, credentials: Annotated[Credentials, Depends(api_bearer)]) -> Serving:
    check_api_token(request, credentials)  # 401 comes before "not ready"
    state = request.app.state
    registry: ModelRegistry = state.models
    return Serving(registry.current(), state.pipeline, state.settings)


ServingDep = Annotated[Serving, Depends(_serving)]
SettingsDep = Annotated[Settings, Depends(_settings)]
LifecycleDep = Annotated[Lifecycle, Depends(_lifecycle)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
CurrentModel = Annotated[Predictor, Depends(_current_model)]
