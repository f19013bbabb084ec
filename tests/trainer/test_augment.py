import torch

from trainer.augment import AugmentConfig, augment


def _digit_one() -> torch.Tensor:
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 4:24, 13:15] = 1.0  # a vertical bar, like a "1"
    return x


def test_augment_keeps_shape_and_range() -> None:
    out = augment(torch.rand(16, 1, 28, 28), AugmentConfig(), torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 28, 28)
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


def test_augment_is_reproducible_with_a_seeded_generator() -> None:
    x = _digit_one()
    a = augment(x, AugmentConfig(), torch.Generator().manual_seed(7))
    b = augment(x, AugmentConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_augment_changes_images_but_keeps_the_ink() -> None:
    x = _digit_one()
    out = augment(x, AugmentConfig(apply_prob=1.0, stroke_prob=0.0), torch.Generator().manual_seed(1))
    assert not torch.allclose(out, x)
    ink_ratio = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert bool(((ink_ratio > 0.5) & (ink_ratio < 2.0)).all())  # warped, not erased or smeared


def test_stroke_width_change_thickens_and_thins() -> None:
    x = _digit_one()
    cfg = AugmentConfig(apply_prob=0.0, elastic_px=0.0, stroke_prob=1.0)
    out = augment(x, cfg, torch.Generator().manual_seed(3))
    ink = out.sum(dim=(1, 2, 3))
    assert bool((ink > x[0].sum() * 1.1).any())
    assert bool((ink < x[0].sum() * 0.9).any())


def test_clean_prob_leaves_images_exactly_as_they_were() -> None:
    x = _digit_one()
    out = augment(x, AugmentConfig(clean_prob=1.0), torch.Generator().manual_seed(2))
    assert torch.equal(out, x)  # apply_prob alone never does: elastic and stroke changes still apply
