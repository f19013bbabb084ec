"""Accuracy on canvas-style drawings through the real endpoint and the committed model."""

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.config import Settings
from tests.service.drawings import drawings, predict_all
from trainer.data import load_mnist

REPO = Path(__file__).resolve().parents[2]
TARGET = 0.97


@pytest.mark.dataset
def test_stroke_drawn_digits_are_recognised() -> None:
    test = load_mnist().test
    items = drawings(test.images, test.labels, count=300, seed=7)
    app = create_app(Settings(artifact_dir=REPO / "artifacts"), metrics_registry=CollectorRegistry())
    with TestClient(app) as client:
        predicted = predict_all(
            lambda png: client.post("/v1/predict/image", content=png, headers={"Content-Type": "image/png"}), items
        )
    accuracy = float(np.mean([p == item.label for p, item in zip(predicted, items, strict=True)]))
    assert accuracy >= TARGET, f"{accuracy:.1%} of 300 drawings recognised"
