"""Turn any picture of a digit into MNIST form, the way the MNIST set itself was made.

Composite transparency, grayscale, detect polarity (dark ink on light paper is inverted),
crop to the ink, scale the longer side to 20 px with antialiasing keeping the aspect
ratio, and place it in a 28x28 field with its centre of mass at pixel (14, 14).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput, NoDigitFound, PayloadTooLarge, UnsupportedMediaType

FIELD = 28  # MNIST image side
BOX = 20  # MNIST fits the digit's longer side into 20 px
CENTRE = 14.0  # MNIST's centre of mass (measured: 14.00 +- 0.29, i.e. an integer shift)
NOISE = 0.1  # ink below this (after background removal) is paper texture or JPEG noise
MIN_PEAK = 0.2  # nothing darker than this against the background counts as ink
MIN_INK_PIXELS = 3
WORKING_SIDE = 1024  # big images are shrunk to about this before any float maths (memory, time)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

ALLOWED_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "GIF": "image/gif",
}


class InvalidImage(InvalidInput):
    code = "invalid_image"


class ImageTooLarge(PayloadTooLarge):
    code = "image_too_large"


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read a PNG, JPEG, WebP, BMP or GIF header and check its size; pixels are not decoded yet,
    so oversized images (decompression bombs) are refused before they cost memory."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image dimensions are too large (limit {max_pixels} pixels)") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType("not a recognised image; send PNG, JPEG, WebP, BMP or GIF") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"the image cannot be decoded: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    return image


def decode_first_frame(image: Image.Image) -> Image.Image:
    try:
        image.seek(0)  # animated images: the first frame only; the others are never decoded
        if image.format == "JPEG" and max(image.size) > WORKING_SIDE:
            image.draft(image.mode, (WORKING_SIDE, WORKING_SIDE))  # JPEG decodes at reduced scale
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"the image is truncated or corrupt: {exc}") from exc
    return image


def _shrink(image: Image.Image) -> Image.Image:
    """Box-reduce images larger than WORKING_SIDE; the digit ends up 20 px tall anyway."""
    factor = math.ceil(max(image.size) / WORKING_SIDE)
    if factor <= 1:
        return image
    if image.mode not in ("L", "LA", "RGB", "RGBA", "F"):
        image = image.convert("F" if image.mode in SIXTEEN_BIT_MODES else "RGBA")
    return image.reduce(factor)


def image_to_gray(image: Image.Image) -> np.ndarray:
    """Grayscale float32 in 0..1 of any mode, transparency composited onto a background
    that contrasts with the ink (so white ink on a transparent canvas survives)."""
    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit PNGs and friends: convert("L") would clip them to white
        values = np.asarray(_shrink(image), dtype=np.float32)
        scale = 65535.0 if values.max() > 255 else 255.0
        return np.clip(values / scale, 0.0, 1.0)
    transparent = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    image = _shrink(image)
    if not transparent:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    la = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32) / 255.0
    gray, alpha = la[..., 0], la[..., 1]
    opacity = float(alpha.sum())
    if opacity == 0.0:
        return np.zeros_like(gray)  # fully transparent: blank
    ink_level = float((gray * alpha).sum()) / opacity
    background = 1.0 if ink_level < 0.5 else 0.0
    return gray * alpha + background * (1.0 - alpha)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Any-size grayscale (0..1, either polarity) -> 28x28 float32, white digit on black."""
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise InvalidInput(f"expected a 2-D image, got shape {gray.shape}")
    x = gray.astype(np.float32, copy=False)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    background = float(np.median(border))
    if background > 0.5:  # dark ink on light paper
        x = 1.0 - x
        background = 1.0 - background
    x = np.clip((x - background) / max(1.0 - background, 1e-6), 0.0, 1.0)
    x[x < NOISE] = 0.0
    peak = float(x.max())
    ink = x > 0
    if peak < MIN_PEAK or int(ink.sum()) < MIN_INK_PIXELS:
        raise NoDigitFound("no digit found: the image is blank or has too little ink")
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(Image.fromarray(crop, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    resized = np.clip(resized, 0.0, None)
    resized /= max(float(resized.max()), 1e-6)  # thin strokes shrunk from a big canvas stay bright
    return _centre_of_mass_in_field(resized)


def _centre_of_mass_in_field(digit: np.ndarray) -> np.ndarray:
    height, width = digit.shape
    total = float(digit.sum())
    com_y = float((digit.sum(axis=1) * np.arange(height)).sum()) / total
    com_x = float((digit.sum(axis=0) * np.arange(width)).sum()) / total
    top = int(np.clip(round(CENTRE - com_y), 0, FIELD - height))
    left = int(np.clip(round(CENTRE - com_x), 0, FIELD - width))
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    field[top : top + height, left : left + width] = digit
    return field


def image_to_mnist(image: Image.Image) -> np.ndarray:
    """An opened image -> 28x28 MNIST form. Raises NoDigitFound for blank images."""
    return to_mnist(image_to_gray(decode_first_frame(image)))
