"""The hand-written server the benchmark compares with: FastAPI as one would write it by hand, no batching.

    BENCH_MODEL_DIR=artifacts/mnist-cnn/1 uvicorn bench.handwritten:app --host 127.0.0.1 --port 8001
    curl --data-binary @digit.png http://127.0.0.1:8001/predict/image

Pillow decodes the posted PNG, one forward pass per request on the event loop (as tutorials write it),
a JSON reply. Nothing tuned: torch's default threads, uvicorn's defaults."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from PIL import Image

MODEL_DIR = Path(os.environ["BENCH_MODEL_DIR"])
model = torch.jit.load(str(MODEL_DIR / "model.pt"), map_location="cpu").eval()
metadata = json.loads((MODEL_DIR / "metadata.json").read_text())
temperature = float(metadata["temperature"])
bfloat16 = metadata.get("precision", "float32") == "bfloat16"  # the numerics the artifact was measured in

app = FastAPI()


@app.post("/predict/image")
async def predict_image(request: Request) -> dict[str, object]:
    image = Image.open(io.BytesIO(await request.body())).convert("L").resize((28, 28))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        logits = model(x).float()
    probabilities = torch.softmax(logits / temperature, dim=1)[0]
    return {"digit": int(probabilities.argmax()), "probabilities": probabilities.tolist()}
