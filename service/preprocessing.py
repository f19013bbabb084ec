"""Turn any picture of a digit into what the model sees, the way the MNIST set itself was made.

Composite transparency, grayscale, detect polarity (dark ink on light paper is inverted),
crop to the ink, scale the longer side to 20 px with antialiasing keeping the aspect
ratio, and place it in a 28x28 field with its centre of mass at pixel (14, 14).

Every API (/v1 pixels, /v1 images, /v2 tensors) ends here, and one rule decides that an
input holds no digit (`check_ink`): such an input gets an answer saying so, not a guess.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

FIELD = 28  # MNIST image side
BOX = 20  # MNIST fits the digit's longer side into 20 px
CENTRE = 14.0  # MNIST's centre of mass (measured: 14.00 +- 0.29, i.e. an integer shift)
NOISE = 0.1  # ink below this (after background removal) is paper texture or JPEG noise
MIN_PEAK = 0.2  # nothing darker than this against the background counts as ink
MIN_INK_PIXELS = 3
INK_LEVEL = 0.05  # a model-ready pixel at least this bright is ink
NO_DIGIT = "no digit found: the image is blank or has too little ink"
WORKING_SIDE = 1024  # big images are shrunk to about this before any float maths (memory, time)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PNG's 16-bit grayscale opens as one of these
WIDE_MODES = (*SIXTEEN_BIT_MODES, "F")

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


@dataclass(frozen=True)
class NoDigit:
    """An input that holds no digit, and why: answered as such instead of being guessed at."""

    reason: str = NO_DIGIT


Prepared = np.ndarray | NoDigit  # a 28x28 float32 model input, or why there is none


def check_ink(image: np.ndarray) -> Prepared:
    """The one rule for "no digit": fewer than MIN_INK_PIXELS pixels of a 28x28 model input
    reach INK_LEVEL. A blank array would otherwise come back as a confident guess."""
    if int(np.count_nonzero(image >= INK_LEVEL)) < MIN_INK_PIXELS:
        return NoDigit()
    return image


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
        image = image.convert("F" if image.mode in WIDE_MODES else "RGBA")
    return image.reduce(factor)


def image_to_gray(image: Image.Image) -> np.ndarray:
    """Grayscale float32 in 0..1 of any mode, transparency composited onto a background
    that contrasts with the ink (so white ink on a transparent canvas survives)."""
    if image.mode in WIDE_MODES:  # convert("L") would clip 16-bit values to white
        # The mode, not the values, says the scale: a dark 16-bit image (all values under 256)
        # is still 16-bit. Float images are taken as 0..1.
        scale = 1.0 if image.mode == "F" else 65535.0
        return np.clip(np.asarray(_shrink(image), dtype=np.float32) / scale, 0.0, 1.0)
    transparent = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    image = _shrink(image)
    if not transparent:
        gray = image if image.mode == "L" else image.convert("L")
        pixels = np.frombuffer(gray.tobytes(), dtype=np.uint8).reshape(gray.height, gray.width)
        return pixels / np.float32(255.0)
    la = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32) / 255.0
    gray, alpha = la[..., 0], la[..., 1]
    return gray * alpha + _transparent_fill(gray, alpha) * (1.0 - alpha)


def _transparent_fill(gray: np.ndarray, alpha: np.ndarray) -> float:
    """What transparent pixels become: the paper around the ink, so transparent margins read as
    background. When the opaque region holds ink and paper (a white card with a dark digit on
    it), the paper is the colour of that region's border, not the mean of all opaque pixels
    (which a big card would push towards paper-as-ink). When everything opaque is ink (strokes
    on a transparent canvas), the fill is the opposite of the ink."""
    peak = float(alpha.max())
    if peak == 0.0:
        return 0.0  # fully transparent: blank
    opaque = alpha >= 0.5 * peak  # relative: a pen at 40 % opacity still draws "opaque" strokes
    padded = np.pad(opaque, 1, constant_values=False)
    surrounded = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    border = float(np.median(gray[opaque & ~surrounded]))  # opaque pixels touching transparency or the edge
    # Ink is anything at least MIN_PEAK away from the paper: pencil on grey card counts too.
    contrasting = int(np.count_nonzero(np.abs(gray[opaque] - border) >= MIN_PEAK))
    if contrasting >= MIN_INK_PIXELS:
        return border  # ink inside a region of paper: the border is the paper
    return 1.0 if border < 0.5 else 0.0


def to_mnist(gray: np.ndarray) -> Prepared:
    """Any-size grayscale (0..1, either polarity) -> 28x28 float32, white digit on black."""
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise InvalidInput(f"expected a 2-D image, got shape {gray.shape}")
    # Every image of every request passes here, mostly small ones: plain ufuncs with `out=`
    # instead of np.median/np.clip, whose generic wrappers cost more than the arithmetic.
    x = np.array(gray, dtype=np.float32)  # a copy: modified in place below
    background = _median(np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]]))
    if background > 0.5:  # dark ink on light paper
        np.subtract(1.0, x, out=x)
        background = 1.0 - background
    np.subtract(x, background, out=x)
    np.divide(x, max(1.0 - background, 1e-6), out=x)
    np.minimum(x, 1.0, out=x)
    x[x < NOISE] = 0.0  # negatives (darker than the background) included
    ink = x > 0
    if float(x.max()) < MIN_PEAK or int(np.count_nonzero(ink)) < MIN_INK_PIXELS:
        return NoDigit()
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = np.ascontiguousarray(x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # frombuffer/tobytes rather than fromarray/np.array: the same pixels, a third of the overhead.
    small = Image.frombuffer("F", (width, height), crop, "raw", "F", 0, 1).resize(size, Image.Resampling.BILINEAR)
    resized = np.frombuffer(small.tobytes(), dtype=np.float32).reshape(size[1], size[0]).copy()
    np.maximum(resized, 0.0, out=resized)
    np.divide(
        resized, max(float(resized.max()), 1e-6), out=resized
    )  # thin strokes shrunk from a big canvas stay bright
    return check_ink(_centre_of_mass_in_field(resized))


def _median(values: np.ndarray) -> float:
    """np.median's value (for float32, the two middle values averaged in float32), without its overhead."""
    ordered = np.sort(values)
    middle = len(ordered) // 2
    return float(
        ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / ordered.dtype.type(2)
    )


_POSITIONS = np.arange(BOX, dtype=np.float64)  # row and column indices of a digit scaled into the box


def _centre_of_mass_in_field(digit: np.ndarray) -> np.ndarray:
    height, width = digit.shape
    total = float(digit.sum())
    com_y = float(digit.sum(axis=1) @ _POSITIONS[:height]) / total
    com_x = float(digit.sum(axis=0) @ _POSITIONS[:width]) / total
    top = min(max(round(CENTRE - com_y), 0), FIELD - height)
    left = min(max(round(CENTRE - com_x), 0), FIELD - width)
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    field[top : top + height, left : left + width] = digit
    return field


def prepare_pixels(array: np.ndarray, preprocess: bool) -> Prepared:
    """A pixel array -> the model's input: made MNIST-like first when `preprocess`, else taken
    as an MNIST-form 28x28 array (0..1, white on black) as it is."""
    return to_mnist(array) if preprocess else check_ink(array)


def prepare_image(image: Image.Image, preprocess: bool) -> Prepared:
    """An opened image -> the model's input. Without `preprocess` it must already be MNIST-form:
    28x28, white digit on black; it is only made grayscale 0..1."""
    gray = image_to_gray(decode_first_frame(image))
    if preprocess:
        return to_mnist(gray)
    if gray.shape != (FIELD, FIELD):
        raise InvalidInput(
            f"without preprocessing the image must be {FIELD}x{FIELD} (MNIST form), "
            f"got {gray.shape[1]}x{gray.shape[0]}; send preprocess=true for other sizes"
        )
    return check_ink(np.ascontiguousarray(gray, dtype=np.float32))
