"""POST /v1/predict (pixel arrays) and POST /v1/predict/image (uploaded images).

Handlers translate HTTP into images and images into predictions; the batcher does the rest.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.config import Settings
from service.errors import BadRequest, ErrorBody, InvalidInput, NoDigitFound, PayloadTooLarge, UnsupportedMediaType
from service.inference import admit_early, client_timeout, run_inference
from service.preprocessing import ALLOWED_FORMATS, image_to_mnist, open_image, to_mnist
from service.schemas import BatchPredictResponse, ModelRef, Prediction, PredictRequest, PredictResponse
from service.state import ServingState, State

router = APIRouter(prefix="/v1", tags=["prediction"])

INLINE_PIXELS = 512 * 512  # larger images are preprocessed on a worker thread, off the event loop
INLINE_BODY_BYTES = 256 * 1024  # larger JSON bodies are validated on a worker thread
BLANK_LEVEL = 0.05  # a 28x28 array with no pixel this bright holds no digit
IMAGE_TYPES = sorted(set(ALLOWED_FORMATS.values()))

_COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "a bearer token is required (when tokens are configured)"},
    413: {"model": ErrorBody, "description": "body, image or image count over the limits"},
    422: {"model": ErrorBody, "description": "input of the wrong shape, type or range"},
    429: {"model": ErrorBody, "description": "queue full; see the Retry-After header"},
    500: {"model": ErrorBody, "description": "the model failed on this batch"},
    503: {"model": ErrorBody, "description": "not ready, or shutting down"},
    504: {"model": ErrorBody, "description": "no result within the request timeout"},
}


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


def _validation_message(exc: ValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = exc.errors(include_url=False)
    # For a union (rows or flat list) the branch that does not fit the input's shape only
    # says "should be a valid list"; the other branch names the real problem.
    errors = [e for e in errors if e["type"] != "list_type"] or errors
    details = []
    for error in errors[:20]:
        loc = ".".join(str(p) for p in error["loc"] if isinstance(p, int) or p.isidentifier())
        details.append({"field": loc or "body", "problem": error["msg"]})
    first = details[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{first['field']}: {first['problem']}{more}", details


async def _predict(
    state: ServingState,
    images: list[np.ndarray | str],
    return_input: bool,
    preprocess_s: float,
    timeout_s: float | None,
) -> tuple[list[Prediction], dict[str, str]]:
    """Run the images (str entries: why there is no digit) through the shared inference path.
    Returns the predictions and the headers saying how they were served."""
    predictor, _ = state.serving()
    arrays = [image for image in images if not isinstance(image, str)]
    headers = {
        "X-Model-Version": str(predictor.version),
        "X-Batch-Size": "0",
        "Server-Timing": f"queue;dur=0.000, preprocess;dur={1000 * preprocess_s:.3f}, inference;dur=0.000",
    }
    rows = iter(())
    if arrays:
        tensor = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
        served = await run_inference(state, tensor, preprocess_s, timeout_s)
        headers = served.headers
        rows = iter(
            zip(
                served.digits.tolist(),
                served.confidences.tolist(),
                served.probabilities.tolist(),
                arrays,
                strict=True,
            )
        )
    predictions: list[Prediction] = []
    for image in images:
        if isinstance(image, str):
            predictions.append(Prediction(digit=None, confidence=None, probabilities=None, detail=image))
            continue
        digit, confidence, probs, seen = next(rows)
        prediction = Prediction(digit=digit, confidence=confidence, probabilities=probs)
        if return_input:
            prediction.input = np.round(seen, 4).tolist()
        predictions.append(prediction)
    return predictions, headers


def _render(state: ServingState, predictions: list[Prediction], single: bool, headers: dict[str, str]) -> Response:
    assert state.predictor is not None
    model = ModelRef(name=state.predictor.name, version=state.predictor.version)
    if single:
        body = PredictResponse(model=model, **predictions[0].model_dump(exclude_unset=True))
    else:
        body = BatchPredictResponse(predictions=predictions, model=model)
    return Response(
        content=body.model_dump_json(exclude_unset=True),
        media_type="application/json",
        headers=headers,
    )


@router.post(
    "/predict",
    summary="Recognise digits from pixel arrays",
    response_model=PredictResponse | BatchPredictResponse,
    response_model_exclude_unset=True,
    responses={400: {"model": ErrorBody, "description": "empty body or malformed JSON"}, **_COMMON_ERRORS},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    },
)
async def predict_pixels(request: Request, state: State) -> Response:
    """Send `{"pixels": ...}` for one image or `{"instances": [...]}` for several. Pixels are 0..1,
    white digit on black, 28x28 (nested or flat). With `"preprocess": true` any size and
    polarity is accepted and centred and scaled like MNIST first. One image answers
    `{"digit", "confidence", "probabilities", "model"}`; instances answer `{"predictions": [...], "model"}`.
    Headers: `X-Model-Version`, `X-Batch-Size`, `Server-Timing` (queue, preprocess, inference in ms)."""
    state.api_auth.verify(request.headers.get("authorization"))
    timeout_s = client_timeout(request.headers)
    admit_early(state, timeout_s)  # not ready, queue full or hopeless: say so before reading the body
    body = await request.body()
    if not body.strip():
        raise BadRequest("request body is empty; send a JSON object")
    started = time.perf_counter()
    if len(body) > INLINE_BODY_BYTES:  # big bodies are decoded off the event loop
        payload, images = await run_in_threadpool(_decode_pixels, body, state.settings)
    else:
        payload, images = _decode_pixels(body, state.settings)
    preprocess_s = time.perf_counter() - started
    predictions, headers = await _predict(state, images, payload.return_input, preprocess_s, timeout_s)
    return _render(state, predictions, payload.pixels is not None, headers)


def _decode_pixels(body: bytes, settings: Settings) -> tuple[PredictRequest, list[np.ndarray | str]]:
    """Validate a /v1/predict body and turn it into 28x28 images (str: why there is no digit)."""
    try:
        payload = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise BadRequest("request body is not valid JSON") from None
        message, details = _validation_message(exc)
        raise InvalidInput(message, details=details) from None
    single = payload.pixels is not None
    raw = [payload.pixels] if payload.pixels is not None else payload.instances or []
    if len(raw) > settings.max_instances:
        raise PayloadTooLarge(f"too many instances: {len(raw)} (limit {settings.max_instances})")
    images: list[np.ndarray | str] = []
    for index, pixels in enumerate(raw):
        where = "pixels" if single else f"instances.{index}"
        array = _as_array(pixels, payload.preprocess, settings.max_preprocess_side, where)
        if payload.preprocess:
            try:
                array = to_mnist(array)
            except NoDigitFound as exc:
                images.append(exc.message)
                continue
        elif float(array.max()) < BLANK_LEVEL:
            images.append("no digit found: the image is blank")  # an answer, not a guess
            continue
        images.append(array)
    return payload, images


async def _read_images(request: Request, state: ServingState) -> tuple[list[bytes], bool]:
    """The uploaded images' bytes, and whether the request was a single raw image."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        limit = state.settings.max_files
        try:
            form = await request.form(max_files=limit, max_fields=limit)
        except HTTPException as exc:  # Starlette's multipart parser refuses with 400
            if "Too many files" in str(exc.detail):
                raise PayloadTooLarge(f"too many files: the limit is {limit} per request") from None
            raise BadRequest(f"malformed multipart body: {exc.detail}") from None
        try:
            uploads = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
            if not uploads:
                raise InvalidInput("multipart body has no `file` field with an image")
            return [await upload.read() for upload in uploads], len(uploads) == 1
        finally:
            await form.close()
    if content_type in IMAGE_TYPES:
        return [await request.body()], True
    shown = content_type or "none"
    raise UnsupportedMediaType(
        f"content type {shown} is not supported; send multipart/form-data or one of {', '.join(IMAGE_TYPES)}"
    )


def _image_to_mnist_or_reason(image: Any) -> np.ndarray | str:
    try:
        return image_to_mnist(image)
    except NoDigitFound as exc:
        return exc.message


@router.post(
    "/predict/image",
    summary="Recognise digits in uploaded images",
    response_model=PredictResponse | BatchPredictResponse,
    response_model_exclude_unset=True,
    responses={
        400: {"model": ErrorBody, "description": "malformed multipart body or deadline header"},
        415: {"model": ErrorBody, "description": "not an image type we read"},
        **_COMMON_ERRORS,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                        "required": ["file"],
                    }
                },
                **{media: {"schema": {"type": "string", "format": "binary"}} for media in IMAGE_TYPES},
            },
        }
    },
)
async def predict_image(
    request: Request,
    state: State,
    return_input: Annotated[bool, Query(description="include the 28x28 array the model saw")] = False,
) -> Response:
    """Upload images as multipart field `file` (repeat it for several) or send one image as the raw
    body with its `Content-Type`. PNG, JPEG, WebP, BMP or GIF (first frame), any size up to the pixel
    limit, any mode; dark-on-light and light-on-dark both work. The image is made MNIST-like: cropped
    to the ink, scaled to 20 px, centred by mass in 28x28. A blank image answers `digit: null` with
    a `detail` saying no digit was found. Several files answer `{"predictions": [...]}`."""
    state.api_auth.verify(request.headers.get("authorization"))
    timeout_s = client_timeout(request.headers)
    admit_early(state, timeout_s)  # not ready, queue full or hopeless: say so before reading the body
    blobs, single = await _read_images(request, state)
    started = time.perf_counter()
    images: list[np.ndarray | str] = []
    for index, blob in enumerate(blobs):
        try:
            image = open_image(blob, state.settings.max_image_pixels)
        except (InvalidInput, PayloadTooLarge, UnsupportedMediaType) as exc:
            if not single:
                exc.message = f"file {index + 1}: {exc.message}"
            raise
        if image.width * image.height > INLINE_PIXELS:
            async with state.big_image_slots:
                images.append(await run_in_threadpool(_image_to_mnist_or_reason, image))
        else:
            images.append(_image_to_mnist_or_reason(image))
    preprocess_s = time.perf_counter() - started
    predictions, headers = await _predict(state, images, return_input, preprocess_s, timeout_s)
    return _render(state, predictions, single, headers)
