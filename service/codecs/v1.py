"""The /v1 codec: pixel-array JSON and uploaded images in, prediction JSON out.

Response shape follows the request's form, never the number of results: `{"pixels": ...}`
and a raw image body answer one prediction object; `{"instances": [...]}` and multipart
uploads (one file or several) answer `{"predictions": [...]}`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from pydantic import ValidationError

from service.config import Settings
from service.errors import BadRequest, InvalidInput, PayloadTooLarge, ServiceError, describe_validation
from service.pipeline import Outcome
from service.preprocessing import Prepared, open_image, prepare_image, prepare_pixels
from service.schemas import PredictRequest

T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """`return_input` and `preprocess` as query parameters (None: not given); both routes take them."""

    return_input: bool | None = None
    preprocess: bool | None = None


@dataclass(frozen=True)
class Decoded:
    inputs: list[Prepared]
    timeout_s: float | None
    single: bool  # answer one object rather than {"predictions": [...]}
    return_input: bool


def _choose(name: str, query: bool | None, body: bool | None, default: bool) -> bool:
    if query is not None and body is not None and query != body:
        raise InvalidInput(f"{name} is given twice with different values (query: {query}, body: {body})")
    for value in (query, body):
        if value is not None:
            return value
    return default


def _as_array(pixels: list[Any], preprocess: bool, max_side: int, where: str) -> np.ndarray:
    try:
        array = np.asarray(pixels, dtype=np.float32)
    except ValueError:
        raise InvalidInput(f"{where}: rows must all have the same length (or give one flat list)") from None
    if array.ndim == 1:
        side = round(len(array) ** 0.5)
        if side * side != len(array) or (not preprocess and side != 28):
            expected = "784 values (28x28)" if not preprocess else "a square number of values"
            raise InvalidInput(f"{where}: expected {expected}, got {len(array)}")
        array = array.reshape(side, side)
    if array.ndim != 2:
        raise InvalidInput(f"{where}: expected a 2-D array of numbers, got {array.ndim} dimensions")
    if not preprocess and array.shape != (28, 28):
        raise InvalidInput(
            f"{where}: expected 28x28, got {array.shape[0]}x{array.shape[1]}; send preprocess=true for other sizes"
        )
    if max(array.shape) > max_side:
        raise PayloadTooLarge(f"{where}: {array.shape[0]}x{array.shape[1]} is over the {max_side}-pixel side limit")
    return array


def decode_pixels(body: bytes, options: Options, settings: Settings, timeout_s: float | None) -> Decoded:
    """A /v1/predict JSON body -> model inputs."""
    try:
        payload = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise BadRequest("request body is not valid JSON") from None
        message, details = describe_validation(exc.errors(include_url=False))
        raise InvalidInput(message, details=details) from None
    given = payload.model_fields_set
    preprocess = _choose(
        "preprocess", options.preprocess, payload.preprocess if "preprocess" in given else None, default=False
    )
    return_input = _choose(
        "return_input", options.return_input, payload.return_input if "return_input" in given else None, default=False
    )
    single = payload.pixels is not None
    raw = [payload.pixels] if payload.pixels is not None else payload.instances or []
    if len(raw) > settings.max_instances:
        raise PayloadTooLarge(f"too many instances: {len(raw)} (limit {settings.max_instances})")
    inputs = [
        prepare_pixels(
            _as_array(pixels, preprocess, settings.max_preprocess_side, "pixels" if single else f"instances.{index}"),
            preprocess,
        )
        for index, pixels in enumerate(raw)
    ]
    return Decoded(inputs, timeout_s, single, return_input)


def open_images(blobs: list[bytes], single: bool, settings: Settings) -> list[Image.Image]:
    """Read the uploaded images' headers (cheap: no pixels are decoded yet) and check their size."""
    return [_numbered(single, index, open_image, blob, settings.max_image_pixels) for index, blob in enumerate(blobs)]


def decode_images(images: list[Image.Image], single: bool, options: Options, timeout_s: float | None) -> Decoded:
    """Opened images -> model inputs. Images are made MNIST-like unless preprocess=false."""
    preprocess = _choose("preprocess", options.preprocess, None, default=True)
    inputs = [_numbered(single, index, prepare_image, image, preprocess) for index, image in enumerate(images)]
    return Decoded(inputs, timeout_s, single, _choose("return_input", options.return_input, None, default=False))


def _numbered(single: bool, index: int, step: Callable[..., T], *args: Any) -> T:
    """Run one file's step; with several files, an error names the file by its position."""
    try:
        return step(*args)
    except ServiceError as exc:
        if not single:
            exc.message = f"file {index + 1}: {exc.message}"
        raise


def _prediction(outcome: Outcome, index: int, return_input: bool) -> dict[str, Any]:
    reason = outcome.no_digit[index]
    if reason is not None:
        return {"digit": None, "confidence": None, "probabilities": None, "detail": reason}
    prediction: dict[str, Any] = {
        "digit": int(outcome.digits[index]),
        "confidence": float(outcome.confidences[index]),
        "probabilities": outcome.probabilities[index].tolist(),
    }
    seen = outcome.inputs[index]
    if return_input and seen is not None:
        prediction["input"] = np.round(seen, 4).tolist()
    return prediction


def encode(outcome: Outcome, decoded: Decoded) -> bytes:
    """The response body; `model` names the version that computed every prediction in it."""
    model = {"name": outcome.model.name, "version": outcome.model.version}
    predictions = [_prediction(outcome, i, decoded.return_input) for i in range(len(decoded.inputs))]
    body: dict[str, Any] = (
        {**predictions[0], "model": model} if decoded.single else {"predictions": predictions, "model": model}
    )
    return json.dumps(body, separators=(",", ":")).encode()
