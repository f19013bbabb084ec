"""Measure accuracy on canvas-style drawings (MNIST test digits traced to strokes and redrawn
with a round pen at canvas size) through POST /v1/predict/image with the committed model.

    python scripts/drawing_accuracy.py [--count 1000] [--gallery docs/drawings.png]
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from service.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
from tests.service.drawings import drawings, predict_all  # noqa: E402
from trainer.data import load_mnist  # noqa: E402


def gallery(items, predicted, path: Path, count: int = 40) -> None:
    cols, cell = 10, 96
    rows = -(-min(count, len(items)) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (item, guess) in enumerate(zip(items[:count], predicted[:count], strict=True)):
        x, y = (k % cols) * cell, (k // cols) * (cell + 18)
        sheet.paste(Image.open(io.BytesIO(item.png)).convert("RGB").resize((cell - 4, cell - 4)), (x + 2, y + 2))
        colour = "green" if guess == item.label else "red"
        draw.text((x + 6, y + cell), f"{item.label} -> {guess}", fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gallery", type=Path, default=None, help="save a sheet of the first 40 drawings")
    args = parser.parse_args()
    test = load_mnist().test
    items = drawings(test.images, test.labels, args.count, args.seed)
    app = create_app(Settings(artifact_dir=REPO / "artifacts"), metrics_registry=CollectorRegistry())
    with TestClient(app) as client:
        predicted = predict_all(
            lambda png: client.post("/v1/predict/image", content=png, headers={"Content-Type": "image/png"}), items
        )
    correct = np.array([p == item.label for p, item in zip(predicted, items, strict=True)])
    sizes = np.array([item.size_frac for item in items])
    pens = np.array([item.pen_frac for item in items])
    print(f"drawings recognised: {correct.mean():.2%} of {len(items)}")  # noqa: T201
    for name, values, edges in (
        ("digit size / canvas", sizes, (0.35, 0.5, 0.65, 0.85)),
        ("pen / canvas", pens, (1 / 18, 1 / 14, 1 / 12, 1 / 10)),
    ):
        for low, high in itertools.pairwise(edges):
            picked = (values >= low) & (values < high + 1e-9)
            print(f"  {name} {low:.2f}-{high:.2f}: {correct[picked].mean():.2%} of {picked.sum()}")  # noqa: T201
    if args.gallery:
        gallery(items, predicted, args.gallery)
    return 0


if __name__ == "__main__":
    sys.exit(main())
