"""The model being served: loaded from a verified artifact, placed on a device, warmed up."""

from __future__ import annotations

import logging
import statistics
import time

import torch

from model_artifact import ArtifactMetadata

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DIGIT_DEVICE=cuda, but no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class Predictor:
    """Runs batches through the model. `infer` is called from the batcher's worker thread only."""

    def __init__(self, model: torch.nn.Module, metadata: ArtifactMetadata, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.metadata = metadata
        self._cuda = self.device.type == "cuda"
        self.full_batch_rate = 0.0  # images/s at the largest batch, measured by warm_up()

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> int:
        return self.metadata.version

    @property
    def temperature(self) -> float:
        return self.metadata.temperature

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """What the batcher runs: [B, 1, 28, 28] -> [B, 2, 10], each image's logits and its probabilities
        calibrated with this model's temperature; one softmax for the batch, not one per request."""
        logits = self.infer(images)
        if logits.shape != (len(images), 10):
            raise RuntimeError(f"model returned shape {tuple(logits.shape)} for {len(images)} images, expected (N, 10)")
        return torch.stack((logits, torch.softmax(logits / self.temperature, dim=1)), dim=1)

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, 28, 28] float32 in 0..1 on the CPU -> [B, 10] float32 logits on the CPU."""
        with torch.inference_mode():
            if self._cuda:
                batch = images.pin_memory().to(self.device, non_blocking=True)
                return self.model(batch).float().to("cpu", non_blocking=False)
            return self.model(images).float()

    def warm_up(self, max_batch_size: int, rounds: int = 3) -> None:
        """Run every batch size the batcher can produce (powers of two and the max) so the
        TorchScript executor has specialised them before the first real request. The passes at
        the largest size give `full_batch_rate` (their median: one preempted pass is no figure)."""
        if rounds < 1:
            raise ValueError("rounds must be >= 1")
        sizes = sorted(
            {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size} | {max_batch_size}
        )
        started = time.perf_counter()
        passes_s: list[float] = []
        for size in sizes:
            batch = torch.zeros(size, 1, 28, 28)
            passes_s = []
            for _ in range(rounds):
                pass_started = time.perf_counter()
                logits = self.infer(batch)
                passes_s.append(time.perf_counter() - pass_started)
            if logits.shape != (size, 10):
                raise RuntimeError(
                    f"model returned shape {tuple(logits.shape)} for a batch of {size}, expected ({size}, 10)"
                )
        self.full_batch_rate = max_batch_size / max(statistics.median(passes_s), 1e-9)
        log.info(
            "warmed up at batch sizes %s in %.2f s; %.0f images/s at batch %d",
            sizes,
            time.perf_counter() - started,
            self.full_batch_rate,
            max_batch_size,
        )
