"""Open Inference Protocol (KServe v2) REST codec: inference requests in, responses out.

JSON tensors (flattened or nested, row-major) and the binary tensor data extension: a JSON
header of `Inference-Header-Content-Length` bytes followed by the raw tensors, each input or
output marked with a `binary_data_size` parameter.

An input that holds no digit (the shared rule in `service.preprocessing`) is answered, not
guessed at: `digit` -1, and zeros for its `logits` and `probabilities`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import ServiceError, describe_validation
from service.pipeline import Outcome
from service.preprocessing import Prepared, check_ink

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probabilities", "digit")
INPUT_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
PLATFORM = "pytorch_torchscript"


class ProtocolError(ServiceError):
    """A request the protocol rejects; rendered as {"error": "..."} with status 400."""

    status_code = 400
    code = "bad_request"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Strict):
    name: str
    shape: list[int] = Field(min_length=1)
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestOutput(_Strict):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(_Strict):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class Decoded:
    id: str | None
    inputs: list[Prepared]  # one 28x28 float32 in 0..1 per image, or why it holds no digit
    outputs: list[tuple[str, bool]]  # (name, as binary)
    timeout_s: float | None  # the client's deadline: the `timeout` parameter or the header, whichever is sooner


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {length} does not fit a body of {len(body)} bytes")
    return body[:length], body[length:]


def _tensor_from_json(data: list[Any], spec: RequestInput, count: int) -> np.ndarray:
    try:
        array = np.asarray(data)
    except ValueError:
        raise ProtocolError(f"input '{spec.name}': nested data must be rectangular") from None
    if array.dtype.kind not in "iuf":  # strings, booleans and mixtures are not pixel values
        raise ProtocolError(f"input '{spec.name}': data must be numbers, got {array.dtype.name} values")
    if array.size != count:
        raise ProtocolError(f"input '{spec.name}': shape {spec.shape} needs {count} values, data has {array.size}")
    if spec.datatype == "UINT8" and array.dtype.kind == "f":
        raise ProtocolError(f"input '{spec.name}': UINT8 data must be integers")
    return array.reshape(-1)


def _tensor_from_binary(blob: bytes, offset: int, spec: RequestInput, count: int) -> tuple[np.ndarray, int]:
    size = spec.parameters.get("binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(f"input '{spec.name}': binary_data_size must be a non-negative integer")
    dtype = INPUT_DTYPES[spec.datatype]
    if size != count * dtype.itemsize:
        raise ProtocolError(
            f"input '{spec.name}': shape {spec.shape} of {spec.datatype} needs {count * dtype.itemsize} bytes, "
            f"binary_data_size says {size}"
        )
    if offset + size > len(blob):
        raise ProtocolError(f"input '{spec.name}': binary data is truncated ({len(blob) - offset} of {size} bytes)")
    return np.frombuffer(blob, dtype=dtype, count=count, offset=offset), offset + size


def _to_images(values: np.ndarray, spec: RequestInput) -> np.ndarray:
    if spec.datatype == "UINT8":
        if values.min() < 0 or values.max() > 255:
            raise ProtocolError(f"input '{spec.name}': UINT8 values must be 0..255")
        images = values.astype(np.float32) / 255.0
    else:
        images = values.astype(np.float32)  # a copy: binary inputs arrive as read-only buffers
        if not np.isfinite(images).all():
            raise ProtocolError(f"input '{spec.name}': FP32 values must be finite (no NaN or Infinity)")
        if images.min() < 0.0 or images.max() > 1.0:
            raise ProtocolError(f"input '{spec.name}': FP32 values must be in 0..1 (white digit on black)")
    return images.reshape(spec.shape[0], 28, 28)


def _flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"parameter '{name}' must be true or false, got {value!r}"[:200])
    return value


def _requested_outputs(request: InferenceRequest) -> list[tuple[str, bool]]:
    default_binary = _flag(request.parameters, "binary_data_output", False)
    if request.outputs is None:
        return [(name, default_binary) for name in OUTPUT_NAMES]
    chosen: list[tuple[str, bool]] = []
    for output in request.outputs:
        if output.name not in OUTPUT_NAMES:
            raise ProtocolError(f"unknown output '{output.name}'; this model has {', '.join(OUTPUT_NAMES)}")
        if output.name in (name for name, _ in chosen):
            raise ProtocolError(f"output '{output.name}' is requested twice")
        chosen.append((output.name, _flag(output.parameters, "binary_data", default_binary)))
    return chosen


def parse_infer_request(
    body: bytes, header_length: str | None, max_images: int, header_timeout_s: float | None = None
) -> Decoded:
    """Decode and check an inference request for the digit model."""
    if not body:
        raise ProtocolError("request body is empty; send an inference request JSON object")
    header, blob = _split_body(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ProtocolError("request body is not valid JSON") from None
        message, _ = describe_validation(exc.errors(include_url=False), limit=1)
        raise ProtocolError(f"invalid inference request: {message}") from None
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        names = ", ".join(f"'{i.name}'" for i in request.inputs)
        raise ProtocolError(f"this model has one input named '{INPUT_NAME}', got {names}")
    spec = request.inputs[0]
    if spec.datatype not in INPUT_DTYPES:
        raise ProtocolError(f"input '{spec.name}': datatype must be FP32 (0..1) or UINT8 (0..255), got {spec.datatype}")
    if spec.shape[1:] not in ([1, 28, 28], [784]) or spec.shape[0] < 1:
        raise ProtocolError(f"input '{spec.name}': shape must be [N, 1, 28, 28] or [N, 784], got {spec.shape}")
    if spec.shape[0] > max_images:
        raise ProtocolError(f"input '{spec.name}': {spec.shape[0]} images is over the limit of {max_images}")
    count = math.prod(spec.shape)
    if "binary_data_size" in spec.parameters:
        values, used = _tensor_from_binary(blob, 0, spec, count)
        if used != len(blob):
            raise ProtocolError(f"{len(blob) - used} bytes of binary data are not claimed by any input")
    elif spec.data is None:
        raise ProtocolError(f"input '{spec.name}': give `data`, or binary data with a binary_data_size parameter")
    else:
        if blob:
            raise ProtocolError("binary data follows the JSON header, but no input has binary_data_size")
        values = _tensor_from_json(spec.data, spec, count)
    timeout = request.parameters.get("timeout")
    timeout_s = timeout / 1e6 if isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0 else None
    deadlines = [t for t in (timeout_s, header_timeout_s) if t is not None]
    inputs = [check_ink(image) for image in _to_images(values, spec)]
    return Decoded(request.id, inputs, _requested_outputs(request), min(deadlines, default=None))


def encode_infer_response(outcome: Outcome, decoded: Decoded) -> tuple[bytes, dict[str, str]]:
    """The response body and its content headers; binary outputs follow the JSON header.
    `model_version` names the version that computed every output."""
    tensors = {"logits": outcome.logits, "probabilities": outcome.probabilities, "digit": outcome.digits}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in decoded.outputs:
        array = tensors[name]
        datatype = "INT64" if array.dtype == np.int64 else "FP32"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = np.ascontiguousarray(array, dtype="<i8" if datatype == "INT64" else "<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    response: dict[str, Any] = {
        "model_name": outcome.model.name,
        "model_version": str(outcome.model.version),
        "outputs": outputs,
    }
    if decoded.id is not None:
        response["id"] = decoded.id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def request_schema() -> dict[str, Any]:
    """The inference request's JSON schema with its `$defs` inlined, for the OpenAPI document
    (a `#/$defs/...` reference would not resolve from the document's root)."""
    schema = InferenceRequest.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


def model_metadata(name: str, version: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [str(version)],
        "platform": PLATFORM,
        # The protocol's tensor metadata names one datatype and shape; `parameters` lists every form
        # this input is accepted in (FP32 0..1 or UINT8 0..255; [N, 1, 28, 28] or [N, 784]).
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": "FP32",
                "shape": [-1, 1, 28, 28],
                "parameters": {
                    "accepted_datatypes": list(INPUT_DTYPES),
                    "accepted_shapes": [[-1, 1, 28, 28], [-1, 784]],
                    "range": {"FP32": [0.0, 1.0], "UINT8": [0, 255]},
                },
            }
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "digit", "datatype": "INT64", "shape": [-1]},
        ],
    }
