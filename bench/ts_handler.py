"""TorchServe handler for the benchmark: the posted 28x28 PNG becomes the model's float32 [1, 1, 28, 28]
0..1 white-on-black input; TorchServe's batch runs as one forward pass; each request gets its digit and
calibrated probabilities as JSON. The model runs in the precision its metadata names, as in the service
(`model_artifact.torchscript.in_precision`, inlined: TorchServe's workers load this one file). Packaged
into the model archive; runs in TorchServe's worker processes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

_model: torch.jit.ScriptModule | None = None
_temperature = 1.0
_bfloat16 = False


def _initialize(context: Any) -> None:
    global _model, _temperature, _bfloat16
    # One thread per worker: the comparison is 2 workers x 1 thread on 2 cores.
    torch.set_num_threads(1)
    model_dir = Path(context.system_properties["model_dir"])
    _model = torch.jit.load(str(model_dir / "model.pt"), map_location="cpu").eval()
    metadata = json.loads((model_dir / "metadata.json").read_text())
    _temperature = float(metadata["temperature"])
    precision = metadata.get("precision", "float32")
    if precision not in ("float32", "bfloat16"):
        raise RuntimeError(f"precision {precision!r} is not supported")
    _bfloat16 = precision == "bfloat16"


def _image(row: dict[str, Any]) -> np.ndarray:
    data = row.get("data") or row.get("body")
    image = Image.open(io.BytesIO(bytes(data))).convert("L")
    if image.size != (28, 28):
        image = image.resize((28, 28))
    return np.asarray(image, dtype=np.float32) / 255.0


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
    if _model is None:
        _initialize(context)
    if data is None:  # TorchServe's start-up call
        return None
    batch = torch.from_numpy(np.stack([_image(row) for row in data]))[:, None]
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bfloat16):
            logits = _model(batch).float()
        probabilities = torch.softmax(logits / _temperature, dim=1)
    return [{"digit": int(p.argmax()), "probabilities": p.tolist()} for p in probabilities]
