"""Pictures of digits built in the tests: strokes drawn with Pillow, saved in various formats."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


def draw_seven(
    size: int = 280,
    box: tuple[float, float, float, float] = (0.25, 0.2, 0.75, 0.8),
    width_frac: float = 0.06,
    ink: int = 0,
    paper: int = 255,
    mode: str = "L",
) -> Image.Image:
    """A '7' as two strokes inside `box` (fractions of the side), dark on light by default."""
    image = Image.new(mode, (size, size), paper if mode == "L" else (paper,) * len(mode))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (v * size for v in box)
    colour = ink if mode == "L" else (ink,) * len(mode)
    width = max(1, int(width_frac * size))
    draw.line([(x0, y0), (x1, y0), (x0 + (x1 - x0) * 0.35, y1)], fill=colour, width=width, joint="curve")
    return image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    return encode(image, "PNG")
