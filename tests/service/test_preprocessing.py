import numpy as np
import pytest
from PIL import Image

from service.errors import UnsupportedMediaType
from service.preprocessing import (
    ImageTooLarge,
    InvalidImage,
    NoDigit,
    check_ink,
    image_to_gray,
    open_image,
    prepare_image,
    to_mnist,
)
from tests.service.images import draw_seven, encode, png


def centre_of_mass(x: np.ndarray) -> tuple[float, float]:
    total = x.sum()
    return float((x.sum(axis=1) * np.arange(28)).sum() / total), float((x.sum(axis=0) * np.arange(28)).sum() / total)


def test_output_is_mnist_shaped_white_on_black_with_20px_box_and_centred_mass() -> None:
    gray = np.asarray(draw_seven(), dtype=np.float32) / 255
    out = to_mnist(gray)
    assert out.shape == (28, 28)
    assert out.dtype == np.float32
    assert out.max() == pytest.approx(1.0)
    assert out[0, 0] == 0.0
    rows, cols = np.nonzero(out)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == 20
    com_y, com_x = centre_of_mass(out)
    assert abs(com_y - 14) <= 0.5
    assert abs(com_x - 14) <= 0.5


def test_aspect_ratio_is_kept() -> None:
    bar = np.zeros((100, 100), dtype=np.float32)
    bar[10:90, 45:55] = 1.0  # a "1": 80 tall, 10 wide
    out = to_mnist(bar)
    rows, cols = np.nonzero(out > 0.05)
    assert np.ptp(rows) + 1 == 20
    assert np.ptp(cols) + 1 <= 4


def test_small_mnist_sized_input_is_treated_like_mnist() -> None:
    digit = np.zeros((28, 28), dtype=np.float32)
    digit[4:24, 12:16] = 1.0
    out = to_mnist(digit)
    assert np.abs(out - digit).max() < 0.3  # already MNIST-like: barely changed


@pytest.mark.parametrize(
    "blank",
    [
        np.zeros((50, 50)),
        np.ones((50, 50)),
        np.full((50, 50), 0.5),
        np.random.default_rng(0).uniform(0.45, 0.5, (50, 50)),
    ],
)
def test_blank_or_nearly_uniform_images_have_no_digit(blank: np.ndarray) -> None:
    assert isinstance(to_mnist(blank.astype(np.float32)), NoDigit)


def test_fully_transparent_image_is_blank() -> None:
    image = open_image(png(Image.new("RGBA", (64, 64), (0, 0, 0, 0))), 10_000)
    assert isinstance(prepare_image(image, preprocess=True), NoDigit)


def test_one_rule_for_no_digit_on_model_inputs() -> None:
    two_dots = np.zeros((28, 28), dtype=np.float32)
    two_dots[10, 10] = two_dots[12, 12] = 1.0
    assert isinstance(check_ink(two_dots), NoDigit)  # two pixels of ink are not a digit
    faint = np.full((28, 28), 0.04, dtype=np.float32)
    assert isinstance(check_ink(faint), NoDigit)  # nothing reaches the ink level
    stroke = np.zeros((28, 28), dtype=np.float32)
    stroke[8:20, 14] = 0.3
    assert check_ink(stroke) is stroke


def test_dark_digit_on_an_opaque_card_with_transparent_margins() -> None:
    # A white card (opaque) with a black 7 on it, inside a transparent border: the margins are
    # paper like the card, not ink (the mean of all opaque pixels is light, so it used to fill dark).
    card = draw_seven(size=200, ink=0, paper=255).convert("RGBA")
    canvas = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    canvas.paste(card, (100, 100))
    gray = image_to_gray(open_image(png(canvas), 1_000_000))
    assert gray[:50, :50].min() == pytest.approx(1.0)  # transparent margin became paper (white)
    out = to_mnist(gray)
    assert not isinstance(out, NoDigit)
    reference = to_mnist(np.asarray(draw_seven(), dtype=np.float32) / 255)
    assert np.abs(out - reference).mean() < 0.05  # the model sees the 7, not a card-shaped blob


def test_light_digit_on_a_dark_card_with_transparent_margins() -> None:
    card = draw_seven(size=200, ink=255, paper=0).convert("RGBA")
    canvas = Image.new("RGBA", (400, 400), (255, 255, 255, 0))
    canvas.paste(card, (100, 100))
    gray = image_to_gray(open_image(png(canvas), 1_000_000))
    assert gray[:50, :50].max() == pytest.approx(0.0)


def test_dark_sixteen_bit_image_keeps_its_scale() -> None:
    # A 16-bit PNG whose values all stay under 256 is nearly black: 200/65535, not 200/255.
    values = np.zeros((64, 64), dtype=np.uint16)
    values[10:50, 30:34] = 200
    image = Image.fromarray(values)  # uint16: mode I;16
    gray = image_to_gray(open_image(png(image), 1_000_000))
    assert gray.max() == pytest.approx(200 / 65535, rel=1e-3)
    bright = values * 300  # the same picture, really bright in 16 bits
    gray_bright = image_to_gray(open_image(png(Image.fromarray(bright)), 1_000_000))
    assert gray_bright.max() == pytest.approx(60000 / 65535, rel=1e-3)


def test_palette_image_with_transparency_is_composited() -> None:
    # Ink and "paper" share one colour; only the transparency tells them apart.
    ink_mask = np.asarray(draw_seven(ink=255, paper=0)) > 0
    image = Image.fromarray(np.where(ink_mask, 0, 1).astype(np.uint8), "P")
    image.putpalette([0, 0, 0] * 2)  # both palette entries black
    image.info["transparency"] = 1  # entry 1 (everything but the strokes) transparent
    gray = image_to_gray(open_image(png(image), 1_000_000))
    assert gray[ink_mask].max() == 0.0  # black ink...
    assert gray[~ink_mask].min() == 1.0  # ...composited onto white, so the digit can be found
    assert (to_mnist(gray) > 0.5).sum() > 20


def test_open_image_refuses_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match="300x300 = 90000 pixels; the limit is 10000"):
        open_image(png(Image.new("L", (300, 300))), 10_000)
    with pytest.raises(UnsupportedMediaType):
        open_image(b"GIF89a-but-not-really", 10_000)
    with pytest.raises(InvalidImage, match="empty"):
        open_image(b"", 10_000)


def test_truncated_image_is_reported_when_decoded() -> None:
    data = encode(draw_seven(), "PNG")[:400]
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        prepare_image(open_image(data, 1_000_000), preprocess=True)


def test_semi_transparent_strokes_on_a_transparent_canvas_are_ink() -> None:
    # A pen at 40 % opacity: no pixel is more than half opaque, yet the strokes are the digit.
    strokes = np.asarray(draw_seven(ink=255, paper=0), dtype=np.uint8) > 0
    rgba = np.zeros((*strokes.shape, 4), dtype=np.uint8)
    rgba[strokes] = (0, 0, 0, 102)
    gray = image_to_gray(open_image(png(Image.fromarray(rgba, "RGBA")), 1_000_000))
    out = to_mnist(gray)
    assert not isinstance(out, NoDigit)
    reference = to_mnist(np.asarray(draw_seven(), dtype=np.float32) / 255)
    assert np.abs(out - reference).mean() < 0.05


@pytest.mark.parametrize(("card", "ink"), [(204, 89), (255, 140)])  # grey card + pencil; white card + grey pencil
def test_low_contrast_cards_with_transparent_margins(card: int, ink: int) -> None:
    drawing = draw_seven(size=200, ink=ink, paper=card).convert("RGBA")
    canvas = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    canvas.paste(drawing, (100, 100))
    gray = image_to_gray(open_image(png(canvas), 1_000_000))
    assert gray[:50, :50].min() == pytest.approx(card / 255, abs=0.01)  # the margins became the card's paper
    out = to_mnist(gray)
    assert not isinstance(out, NoDigit)
    reference = to_mnist(np.asarray(draw_seven(), dtype=np.float32) / 255)
    assert np.abs(out - reference).mean() < 0.05  # the 7, not a card-shaped blob
