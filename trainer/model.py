"""The CNN, and the exported wrapper that bakes input normalisation into the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Mean and standard deviation of MNIST training pixels in 0..1; baked into the artifact
# so clients send plain 0..1 intensities.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class ModelConfig:
    width: int = 32  # channels of the first stage; later stages use 2x and 4x
    dropout: float = 0.2  # after each stage and before the classifier


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class DigitNet(nn.Module):
    """A compact CNN in the style of the strongest small Kaggle MNIST models.

    Valid 3x3 convolutions and learned (strided 5x5) downsampling keep it cheap on CPU:
    28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4 -> 1, then 10 logits. Expects normalised input.
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        w, p = config.width, config.dropout
        self.features = nn.Sequential(
            *_conv_bn(1, w, 3),
            *_conv_bn(w, w, 3),
            *_conv_bn(w, w, 5, stride=2, padding=2),
            nn.Dropout(p),
            *_conv_bn(w, 2 * w, 3),
            *_conv_bn(2 * w, 2 * w, 3),
            *_conv_bn(2 * w, 2 * w, 5, stride=2, padding=2),
            nn.Dropout(p),
            *_conv_bn(2 * w, 4 * w, 4),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Dropout(p), nn.Linear(4 * w, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ExportedModel(nn.Module):
    """What the artifact holds: 0..1 float input [N, 1, 28, 28] -> logits [N, 10].

    Normalisation is baked in, input is switched to channels-last (about 1.5x faster
    convolutions on CPU), and the logits of the member networks are averaged, so a
    small ensemble is one module with one input and one output.
    """

    def __init__(self, members: list[nn.Module], mean: float = MNIST_MEAN, std: float = MNIST_STD) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        total = torch.zeros(x.shape[0], 10, dtype=x.dtype, device=x.device)
        for member in self.members:
            total = total + member(x)
        return total / len(self.members)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
