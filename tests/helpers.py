"""Small collaborators shared by the tests: artifact metadata and a scripted fake model."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from model_artifact import ArtifactMetadata, Evaluation, utc_now


def make_metadata(
    version: int = 1, sha256: str = "a" * 64, name: str = "tiny", temperature: float = 1.0
) -> ArtifactMetadata:
    return ArtifactMetadata(
        name=name,
        version=version,
        created_at=utc_now(),
        torch_version=torch.__version__,
        model_sha256=sha256,
        parameters=0,
        architecture={"class": "MeanIntensityNet"},
        temperature=temperature,
        evaluation=Evaluation(
            test_accuracy=0.9975,
            test_loss=0.01,
            per_class_accuracy=[0.99] * 10,
            confusion_matrix=[[0] * 10 for _ in range(10)],
            val_accuracy=0.998,
            val_ece_before=0.02,
            val_ece_after=0.01,
        ),
        training={
            "command": "python -m trainer train",
            "epochs_run": 1,
            "seconds": 1.0,
            "device": "cpu",
            "config": {"seed": 1},
        },
        dataset_sha256={},
    )


class MeanIntensityNet(nn.Module):
    """A scripted stand-in for the CNN: predicts digit round(9 x mean pixel intensity / 0.9),
    so a test picks the answer by the brightness of the image it sends."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.mean(dim=(1, 2, 3)) * 10.0
        digits = torch.arange(10, dtype=x.dtype, device=x.device)
        return -(level.unsqueeze(1) - digits.unsqueeze(0)).abs() * 8.0


class SlowNet(nn.Module):
    """MeanIntensityNet that takes `delay_s` per forward pass: a model the queue can back up behind."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.inner = MeanIntensityNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.inner(x)


class ExplodingNet(nn.Module):
    """Raises on any image whose first pixel is exactly 0.5; otherwise behaves like MeanIntensityNet."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MeanIntensityNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0, 0, 0] == 0.5).any()):
            raise RuntimeError("simulated model failure")
        return self.inner(x)


def scripted_mean_net() -> torch.jit.ScriptModule:
    return torch.jit.script(MeanIntensityNet())


class MarkedNet(nn.Module):
    """Wraps a real model; an image whose top-left pixel is lit (a "probe": MNIST digits never light
    it) gets logits that name this model's version: digit `version % 10` with logits shifted by
    `version`, so an answer shows which version computed it. Other images get the real answers, so
    the service's known-digits check passes and a reload accepts it."""

    def __init__(self, inner: nn.Module, version: int) -> None:
        super().__init__()
        self.inner = inner
        self.version = version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        probe = x[:, 0, 0, 0] > 0.99
        marked = torch.full_like(logits, float(self.version))
        marked[:, self.version % 10] += 20.0
        return torch.where(probe.unsqueeze(1), marked, logits)


def probe_image(level: float = 0.5) -> torch.Tensor:
    """A 28x28 image (0..1) with a stroke of `level` and the probe pixel lit."""
    image = torch.zeros(28, 28)
    image[6:22, 13:15] = level
    image[0, 0] = 1.0
    return image


def version_of(logits: list[float]) -> int:
    """The version a MarkedNet's probe logits name (every logit but the chosen one equals it)."""
    return round(sorted(logits)[0])


class Gate(torch.nn.Module):
    """Blocks every forward pass until `opened` is set; records that one began."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.opened = threading.Event()
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.opened.wait(10), "gate never opened"
        return self.inner(x)
