"""The metadata schema of a model artifact (`metadata.json`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"

Precision = Literal["float32", "bfloat16", "int8"]


class InputSpec(BaseModel):
    shape: list[int | None] = Field(default=[None, 1, 28, 28], description="None is the batch dimension")
    dtype: Literal["float32"] = "float32"
    range: tuple[float, float] = (0.0, 1.0)
    polarity: Literal["white-on-black"] = "white-on-black"
    layout: str = "NCHW; normalisation is applied inside the model"


class OutputSpec(BaseModel):
    shape: list[int | None] = Field(default=[None, 10])
    dtype: Literal["float32"] = "float32"
    kind: Literal["logits"] = "logits"


class EpochRecord(BaseModel):
    member: int = 0  # which network of an ensemble
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


class Evaluation(BaseModel):
    test_accuracy: float = Field(description="fraction correct on the official 10k test set")
    test_loss: float
    per_class_accuracy: list[float] = Field(min_length=10, max_length=10)
    confusion_matrix: list[list[int]] = Field(description="rows: true digit, columns: predicted digit")
    val_accuracy: float
    val_ece_before: float = Field(description="expected calibration error on validation, T=1")
    val_ece_after: float = Field(description="expected calibration error on validation, fitted T")


class ArtifactMetadata(BaseModel):
    """Everything needed to use, verify and reproduce a model artifact."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    created_at: datetime
    torch_version: str
    format: Literal["torchscript"] = "torchscript"
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    parameters: int
    architecture: dict[str, Any]
    input: InputSpec = InputSpec()
    output: OutputSpec = OutputSpec()
    labels: list[str] = Field(default=[str(d) for d in range(10)], min_length=10, max_length=10)
    temperature: float = Field(gt=0, description="divide logits by this before softmax")
    evaluation: Evaluation
    training: dict[str, Any] = Field(description="config, seed, command, duration and history")
    history: list[EpochRecord] = []
    dataset_sha256: dict[str, str]
    git_commit: str | None = None
    # Fields added after v1 carry defaults, so v1's metadata.json still loads unchanged.
    precision: Precision = Field(
        default="float32",
        description="the numerics the model file computes in; the evaluation was measured in it",
    )
    smoke: bool = Field(default=False, description="a --dry-run smoke test: never to be served as a model")


def utc_now() -> datetime:
    return datetime.now(UTC)
