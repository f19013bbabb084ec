"""The collaborators routes may ask for, declared once as `Annotated` dependencies.

The app factory puts them on `app.state`; a route names what it needs and nothing more.
The prediction routes use none of these: they run without dependency injection
(`service.routes.prediction_route`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.lifecycle import Lifecycle
from service.model_registry import ModelRegistry
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


SettingsDep = Annotated[Settings, Depends(_settings)]
LifecycleDep = Annotated[Lifecycle, Depends(_lifecycle)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
CurrentModel = Annotated[Predictor, Depends(_current_model)]
