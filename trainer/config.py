"""Training configuration: one dataclass, defaults in one place, each with its unit or reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.augment import AugmentConfig
from trainer.model import ModelConfig

Device = Literal["auto", "cpu", "cuda"]


@dataclass
class TrainConfig:
    model_name: str = "mnist-cnn"  # artifacts/<model_name>/<version>/
    output_dir: Path = Path("artifacts")
    data_dir: Path | None = None  # None: $MNIST_DATA_DIR or the user's cache dir
    seed: int = 1234
    device: Device = "auto"  # auto: CUDA when available, else CPU
    threads: int | None = None  # CPU threads for torch; None keeps torch's default
    members: int = 1  # networks in the exported ensemble (their logits are averaged)
    epochs: int = 16  # per member; a distilled student (teacher forward included) fits 15 min on 2 CPU cores
    teacher: Path | None = None  # an artifact version directory to distil from; None trains on labels only
    distill_temperature: float = 2.0  # softens both sides' logits in the distillation loss
    distill_weight: float = 0.5  # share of the loss from the teacher; the rest is label cross-entropy
    amp: Literal["auto", "off"] = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16
    batch_size: int = 128
    lr: float = 3e-3  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 0.05  # decoupled (AdamW): lr * wd is the per-step shrink
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.2  # share of steps spent rising to the peak learning rate
    ema_decay: float = 0.999  # per step, after a warm-up; the exported weights are the final average
    val_size: int = 5000  # held out from the 60k training images for selection and calibration
    eval_batch_size: int = 1000
    dry_run: bool = False  # a tiny subset and one short epoch, to smoke-test the whole path
    dry_run_train_size: int = 512
    dry_run_val_size: int = 256
    dry_run_test_size: int = 512
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        data["data_dir"] = None if self.data_dir is None else str(self.data_dir)
        data["teacher"] = None if self.teacher is None else str(self.teacher)
        return data
