"""Canvas-style drawings of digits: MNIST test digits traced to centre-line strokes and
redrawn with a round pen at canvas size, at varied sizes, positions and pen widths.

This is what a person drawing on the demo page produces: uniform-width strokes of any
size anywhere on a large canvas, unlike MNIST's centred, 20-px, variable-width digits.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from skimage.morphology import skeletonize

_NEIGHBOURS = [(0, 1), (1, -1), (1, 0), (1, 1)]  # each undirected 8-neighbour link once


@dataclass(frozen=True)
class Drawing:
    png: bytes
    label: int
    size_frac: float  # digit height (or width) as a fraction of the canvas side
    pen_frac: float  # pen width as a fraction of the canvas side


def trace_strokes(digit: np.ndarray) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Centre-line segments ((y0, x0), (y1, x1)) of a 28x28 digit, in its pixel coordinates."""
    skeleton = skeletonize(digit > 80)
    points = np.argwhere(skeleton)
    on = {(int(r), int(c)) for r, c in points}
    segments = []
    for r, c in on:
        linked = False
        for dr, dc in _NEIGHBOURS:
            if (r + dr, c + dc) in on:
                segments.append(((r, c), (r + dr, c + dc)))
                linked = True
        if not linked and not any((r - dr, c - dc) in on for dr, dc in _NEIGHBOURS):
            segments.append(((r, c), (r, c)))  # an isolated dot
    return segments


def render(
    digit: np.ndarray,
    label: int,
    rng: np.random.Generator,
    canvas: int = 280,
    size_range: tuple[float, float] = (0.35, 0.85),
    pen_range: tuple[float, float] = (1 / 18, 1 / 10),
) -> Drawing:
    """Draw `digit`'s strokes on a white canvas with a black round pen, like the demo page."""
    segments = trace_strokes(digit)
    ys = [p[0] for seg in segments for p in seg]
    xs = [p[1] for seg in segments for p in seg]
    y0, y1, x0, x1 = min(ys), max(ys), min(xs), max(xs)
    extent = max(y1 - y0, x1 - x0, 1)
    size_frac = float(rng.uniform(*size_range))
    pen_frac = float(rng.uniform(*pen_range))
    supersample = 2  # draw big and shrink, for antialiased edges like a browser canvas
    side = canvas * supersample
    scale = size_frac * side / extent
    pen = max(1, round(pen_frac * side))
    margin = pen
    free_y = side - (y1 - y0) * scale - 2 * margin
    free_x = side - (x1 - x0) * scale - 2 * margin
    top = margin + float(rng.uniform(0, max(free_y, 0)))
    left = margin + float(rng.uniform(0, max(free_x, 0)))

    image = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(image)

    def place(p: tuple[float, float]) -> tuple[float, float]:
        return (left + (p[1] - x0) * scale, top + (p[0] - y0) * scale)

    radius = pen / 2
    for a, b in segments:
        pa, pb = place(a), place(b)
        draw.line([pa, pb], fill=0, width=pen)
        for x, y in (pa, pb):  # round caps and joins
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=0)
    image = image.resize((canvas, canvas), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Drawing(png=buffer.getvalue(), label=label, size_frac=size_frac, pen_frac=pen_frac)


def drawings(images: np.ndarray, labels: np.ndarray, count: int, seed: int = 0) -> list[Drawing]:
    rng = np.random.default_rng(seed)
    return [render(images[i], int(labels[i]), rng) for i in range(count)]


def predict_all(post_png, items: list[Drawing]) -> list[int | None]:
    """Send each drawing as a canvas PNG to /v1/predict/image through `post_png(bytes) -> response`."""
    predictions = []
    for item in items:
        response = post_png(item.png)
        assert response.status_code == 200, response.text
        predictions.append(response.json()["digit"])
    return predictions
