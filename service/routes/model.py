"""GET /v1/model: the served artifact's metadata."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import CurrentModel
from service.errors import ErrorBody
from service.schemas import ModelInfo

router = APIRouter(prefix="/v1", tags=["model"])


@router.get(
    "/model",
    response_model=ModelInfo,
    summary="Metadata of the model being served",
    responses={503: {"model": ErrorBody, "description": "no model loaded yet"}},
)
async def model_info(model: CurrentModel) -> ModelInfo:
    meta = model.metadata
    training = meta.training
    return ModelInfo(
        name=meta.name,
        version=meta.version,
        created_at=meta.created_at,
        format=meta.format,
        precision=meta.precision,
        parameters=meta.parameters,
        test_accuracy=meta.evaluation.test_accuracy,
        per_class_accuracy=meta.evaluation.per_class_accuracy,
        temperature=meta.temperature,
        input=meta.input.model_dump(),
        output=meta.output.model_dump(),
        labels=meta.labels,
        torch_version=meta.torch_version,
        device=str(model.device),
        training={key: training.get(key) for key in ("command", "epochs_run", "seconds", "device") if key in training}
        | {"seed": training.get("config", {}).get("seed")},
    )
