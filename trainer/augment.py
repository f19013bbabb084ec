"""Batched data augmentation in plain torch ops (no torchvision on CPU-only installs).

People draw thicker, thinner, smaller, rotated and off-centre digits than MNIST's, so a
batch gets a random affine warp, a smooth elastic displacement, and a stroke-width change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 12.0  # max rotation either way
    scale_min: float = 0.8  # digit size relative to MNIST's 20 px box
    scale_max: float = 1.15
    shear: float = 0.15  # max shear factor either way
    shift_px: float = 2.5  # max translation in pixels
    elastic_px: float = 1.5  # max elastic displacement in pixels
    elastic_grid: int = 4  # control points per side of the elastic field
    stroke_prob: float = 0.4  # fraction of images whose stroke width changes
    apply_prob: float = 0.9  # fraction given the affine warp; elastic and stroke changes apply regardless
    clean_prob: float = 0.0  # fraction left exactly as they are (no warp, elastic or stroke change)


def _random_affine(n: int, cfg: AugmentConfig, gen: torch.Generator | None) -> torch.Tensor:
    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (high - low) + low

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180
    # Log-uniform scale; affine_grid maps output to input, so divide by the scale.
    scale = torch.exp(uniform(math.log(cfg.scale_min), math.log(cfg.scale_max)))
    shear = uniform(-cfg.shear, cfg.shear)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (cfg.shift_px * 2 / 28)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin + shear * cos
    theta[:, 1, 0] = sin
    theta[:, 1, 1] = cos + shear * sin
    theta[:, :, 2] = shift
    keep = torch.rand(n, generator=gen) >= cfg.apply_prob
    theta[keep] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return theta


def _elastic_field(n: int, size: int, cfg: AugmentConfig, gen: torch.Generator | None) -> torch.Tensor:
    """A smooth random displacement field [n, size, size, 2] in normalised coordinates."""
    coarse = torch.rand(n, 2, cfg.elastic_grid, cfg.elastic_grid, generator=gen) * 2 - 1
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1) * (cfg.elastic_px * 2 / size)


def _change_stroke_width(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Thicken or thin strokes of a random subset with a 3x3 grey-scale dilation/erosion."""
    n = x.shape[0]
    pick = torch.rand(n, generator=gen)
    thicken = pick < cfg.stroke_prob / 2
    thin = (pick >= cfg.stroke_prob / 2) & (pick < cfg.stroke_prob)
    if not (thicken.any() or thin.any()):
        return x
    # Blend with the morphed image by a random amount so widths vary continuously.
    amount = torch.rand(n, 1, 1, 1, generator=gen) * 0.6 + 0.4
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    out = x.clone()
    out[thicken] = torch.lerp(x[thicken], dilated[thicken], amount[thicken])
    out[thin] = torch.lerp(x[thin], eroded[thin], amount[thin])
    return out


def augment(x: torch.Tensor, cfg: AugmentConfig = AugmentConfig(), gen: torch.Generator | None = None) -> torch.Tensor:
    """Augment a batch of 0..1 images [N, 1, H, W] (white on black); returns the same shape."""
    n, _, h, w = x.shape
    theta = _random_affine(n, cfg, gen)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    if cfg.elastic_px > 0:
        grid = grid + _elastic_field(n, h, cfg, gen)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.stroke_prob > 0:
        warped = _change_stroke_width(warped, cfg, gen)
    warped = warped.clamp_(0.0, 1.0)
    if cfg.clean_prob > 0:  # drawn last, so the default (0) keeps the random stream of earlier runs
        clean = torch.rand(n, generator=gen) < cfg.clean_prob
        warped[clean] = x[clean]
    return warped
