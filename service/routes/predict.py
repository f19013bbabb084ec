"""POST /v1/predict (pixel arrays) and POST /v1/predict/image (uploaded images).

HTTP only: check the caller, resolve the model once, read the body, and hand decoding to the
/v1 codec and the work to the shared pipeline.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.codecs import v1
from service.errors import BadRequest, ErrorBody, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.preprocessing import ALLOWED_FORMATS
from service.routes.http import (
    COMMON_ERRORS,
    INLINE_BODY_BYTES,
    client_timeout,
    media_type,
    require_media_type,
    served_headers,
)
from service.routes.prediction_route import PredictionRoute, flag_parameter, query_flag, serving
from service.schemas import BatchPredictResponse, PredictRequest, PredictResponse

router = APIRouter(prefix="/v1", tags=["prediction"], route_class=PredictionRoute)

IMAGE_TYPES = sorted(set(ALLOWED_FORMATS.values()))
INLINE_PIXELS = 128 * 128  # uploads with more pixels in all are decoded on a worker thread, off the event loop

FLAGS = [
    flag_parameter("return_input", "include the 28x28 array the model saw (also accepted in a JSON body)"),
    flag_parameter(
        "preprocess",
        "make the input MNIST-like first (crop, scale to 20 px, centre by mass). "
        "Default: false for pixel arrays, true for images (also accepted in a JSON body)",
    ),
]


def _options(request: Request) -> v1.Options:
    return v1.Options(return_input=query_flag(request, "return_input"), preprocess=query_flag(request, "preprocess"))


def _response(body: bytes, headers: dict[str, str]) -> Response:
    return Response(content=body, media_type="application/json", headers=headers)


@router.post(
    "/predict",
    summary="Recognise digits from pixel arrays",
    response_model=PredictResponse | BatchPredictResponse,
    response_model_exclude_unset=True,
    responses={400: {"model": ErrorBody, "description": "empty body or malformed JSON"}, **COMMON_ERRORS},
    openapi_extra={
        "parameters": FLAGS,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        },
    },
)
async def predict_pixels(request: Request) -> Response:
    """Send `{"pixels": ...}` for one image or `{"instances": [...]}` for several. Pixels are 0..1,
    white digit on black, 28x28 (nested or flat). With `"preprocess": true` any size and
    polarity is accepted and centred and scaled like MNIST first. `pixels` answers
    `{"digit", "confidence", "probabilities", "model"}`; `instances` answers `{"predictions": [...], "model"}`.
    An image with no digit answers `digit: null` with a `detail`.
    Headers: `X-Model-Version`, `X-Batch-Size`, `Server-Timing` (queue, preprocess, inference in ms)."""
    served = serving(request)
    pipeline, settings = served.pipeline, served.settings
    options = _options(request)
    timeout_s = client_timeout(request)
    require_media_type(request, ["application/json"])
    body = await request.body()
    if not body.strip():
        raise BadRequest("request body is empty; send a JSON object")
    decoded, outcome = await pipeline.run(
        served.model,
        lambda: v1.decode_pixels(body, options, settings, timeout_s),
        offload=len(body) > INLINE_BODY_BYTES,
    )
    return _response(v1.encode(outcome, decoded), served_headers(outcome))


async def _read_uploads(request: Request, max_files: int) -> tuple[list[bytes], bool]:
    """The uploaded images' bytes, and whether the request was one raw image (answered as one object)."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=max_files, max_fields=max_files)
        except HTTPException as exc:  # Starlette's multipart parser refuses with 400
            if "Too many files" in str(exc.detail):
                raise PayloadTooLarge(f"too many files: the limit is {max_files} per request") from None
            raise BadRequest(f"malformed multipart body: {exc.detail}") from None
        try:
            uploads = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
            if not uploads:
                raise InvalidInput("multipart body has no `file` field with an image")
            return [await upload.read() for upload in uploads], False
        finally:
            await form.close()
    if kind in IMAGE_TYPES:
        return [await request.body()], True
    raise UnsupportedMediaType(
        f"content type {kind or 'none'} is not supported; send multipart/form-data or one of {', '.join(IMAGE_TYPES)}"
    )


@router.post(
    "/predict/image",
    summary="Recognise digits in uploaded images",
    response_model=PredictResponse | BatchPredictResponse,
    response_model_exclude_unset=True,
    responses={
        400: {"model": ErrorBody, "description": "malformed multipart body or deadline header"},
        **COMMON_ERRORS,
    },
    openapi_extra={
        "parameters": FLAGS,
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
        },
    },
)
async def predict_image(request: Request) -> Response:
    """Send one image as the raw body with its `Content-Type` (answered as one prediction object), or
    upload images as multipart field `file`, repeated for several (answered as `{"predictions": [...]}`,
    also for one file). PNG, JPEG, WebP, BMP or GIF (first frame), any size up to the pixel limit, any
    mode; dark-on-light and light-on-dark both work. The image is made MNIST-like: cropped to the ink,
    scaled to 20 px, centred by mass in 28x28 (`preprocess=false`: it already is, 28x28 white on black).
    An image with no digit answers `digit: null` with a `detail`."""
    served = serving(request)
    pipeline, settings = served.pipeline, served.settings
    options = _options(request)
    timeout_s = client_timeout(request)
    blobs, single = await _read_uploads(request, settings.max_files)
    images = v1.open_images(blobs, single, settings)  # headers only: sizes are checked before any decoding
    decoded, outcome = await pipeline.run(
        served.model,
        lambda: v1.decode_images(images, single, options, timeout_s),
        offload=sum(image.width * image.height for image in images) > INLINE_PIXELS,
    )
    return _response(v1.encode(outcome, decoded), served_headers(outcome))
