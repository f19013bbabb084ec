"""The one path from images to calibrated predictions, shared by every API (/v1 and /v2):
batcher, temperature, prediction metrics and the headers saying how a request was served."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from service.errors import BadRequest
from service.predictor import Predictor
from service.state import ServingState

TIMEOUT_HEADER = "X-Request-Timeout"  # seconds the client will wait; can only shorten the server's timeout


def client_timeout(headers: Mapping[str, str]) -> float | None:
    """The client's own deadline from the X-Request-Timeout header, if it sent one."""
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise BadRequest(f"{TIMEOUT_HEADER} must be a number of seconds, got {raw[:40]!r}") from None
    if not 0 < seconds < float("inf"):
        raise BadRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw[:40]!r}")
    return seconds


@dataclass(frozen=True)
class Served:
    predictor: Predictor
    logits: torch.Tensor  # [k, 10]
    probabilities: torch.Tensor  # [k, 10], calibrated with the artifact's temperature
    digits: torch.Tensor  # [k] int64
    confidences: torch.Tensor  # [k]
    headers: dict[str, str]


def effective_timeout(state: ServingState, timeout_s: float | None) -> float:
    limit = state.settings.request_timeout_s
    return limit if timeout_s is None else min(timeout_s, limit)


def admit_early(state: ServingState, timeout_s: float | None = None) -> None:
    """Refuse at once, before a body is read, what the batcher would refuse anyway."""
    _, batcher = state.serving()
    batcher.admit(1, effective_timeout(state, timeout_s))


async def run_inference(
    state: ServingState, images: torch.Tensor, preprocess_s: float = 0.0, timeout_s: float | None = None
) -> Served:
    """Queue `images` [k, 1, 28, 28] (0..1) with everyone else's and wait for the result."""
    _, batcher = state.serving()
    result = await batcher.submit(images, effective_timeout(state, timeout_s))
    # The model that computed these logits (a hot reload may have switched since submission).
    predictor = result.served_by
    assert isinstance(predictor, Predictor)
    probabilities = torch.softmax(result.logits / predictor.temperature, dim=1)
    confidences, digits = probabilities.max(dim=1)
    for digit, confidence in zip(digits.tolist(), confidences.tolist(), strict=True):
        state.metrics.predicted(digit, confidence)
    headers = {
        "X-Model-Version": str(predictor.version),
        "X-Batch-Size": str(result.batch_size),
        "Server-Timing": (
            f"queue;dur={1000 * result.queue_s:.3f}, preprocess;dur={1000 * preprocess_s:.3f}, "
            f"inference;dur={1000 * result.inference_s:.3f}"
        ),
    }
    return Served(predictor, result.logits, probabilities, digits, confidences, headers)
