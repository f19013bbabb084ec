"""The training loop: split, train with augmentation and EMA, select, calibrate, test, export."""

from __future__ import annotations

import copy
import logging
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from model_artifact import (
    ArtifactError,
    ArtifactMetadata,
    EpochRecord,
    Evaluation,
    load_model,
    quiet_torchscript,
    save_torchscript,
    utc_now,
    write_artifact,
)
from trainer.augment import augment
from trainer.config import TrainConfig
from trainer.data import Mnist, Split
from trainer.evaluate import (
    expected_calibration_error,
    fit_temperature,
    images_to_tensor,
    predict_logits,
    score,
    write_report,
)
from trainer.model import MNIST_MEAN, MNIST_STD, DigitNet, ExportedModel, count_parameters

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def use_bf16(device: torch.device, amp: str) -> bool:
    """bf16 autocast: on CUDA, and on CPUs with native bf16 dot products (1.5x faster here)."""
    if amp == "off":
        return False
    return device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def member_seed(seed: int, member: int) -> int:
    """Independent streams per (run seed, member): seed s+1's first network is not seed s's second."""
    return int(np.random.SeedSequence([seed, member]).generate_state(1)[0])


def warmup_ema(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor | int], None]:
    """EMA whose decay ramps up as (1 + n) / (10 + n): early averages follow the net instead
    of staying anchored to the random initial weights for thousands of steps."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for avg, cur in zip(averaged, current, strict=True):
            if avg.is_floating_point():
                avg.lerp_(cur, weight)
            else:  # BatchNorm's step counter
                avg.copy_(cur)

    return update


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    """Hinton et al. (2015): KL to the teacher's softened distribution (scaled by T^2 so its
    gradients keep their size), mixed with the usual label cross-entropy."""
    t = cfg.distill_temperature
    soft = F.kl_div(
        F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True, reduction="batchmean"
    )
    hard = F.cross_entropy(student, labels, label_smoothing=cfg.label_smoothing)
    return cfg.distill_weight * soft * t * t + (1 - cfg.distill_weight) * hard


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def split_train_val(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """A seeded random hold-out from the training images; the test set stays untouched."""
    if not 0 < val_size < len(train.labels):
        raise ValueError(f"val_size {val_size} must be between 0 and the {len(train.labels)} training images")
    order = np.random.default_rng(seed).permutation(len(train.labels))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return (
        Split(train.images[train_idx], train.labels[train_idx]),
        Split(train.images[val_idx], train.labels[val_idx]),
    )


def _subset(split: Split, size: int) -> Split:
    return Split(split.images[:size], split.labels[:size])


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


class _Trainer:
    """Holds the state of one run; each method is one step of it."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        generator: torch.Generator,
        member: int,
        teacher: torch.nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.generator = generator
        self.member = member
        self.use_amp = use_bf16(device, cfg.amp)
        self.net = DigitNet(cfg.model).to(device, memory_format=torch.channels_last)
        self.ema = AveragedModel(self.net, multi_avg_fn=warmup_ema(cfg.ema_decay), use_buffers=True)
        self.teacher = teacher
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def schedule(self, steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.OneCycleLR:
        return torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=self.cfg.lr,
            total_steps=max(1, steps_per_epoch * epochs),
            pct_start=self.cfg.warmup_fraction,
        )

    def train_epoch(
        self, images: torch.Tensor, labels: torch.Tensor, scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int
    ) -> tuple[float, float]:
        self.net.train()
        order = torch.randperm(len(labels), generator=self.generator)
        batches = order.split(self.cfg.batch_size)
        total_loss, total_correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        label = (
            f"model {self.member + 1}/{self.cfg.members} epoch {epoch}" if self.cfg.members > 1 else f"epoch {epoch}"
        )
        # Bars only on a terminal; in compose or Kubernetes logs the per-epoch log line is enough.
        bar = tqdm(
            batches,
            desc=label,
            unit="batch",
            leave=True,
            mininterval=1.0,
            dynamic_ncols=True,
            disable=not sys.stderr.isatty(),
        )
        for batch in bar:
            raw = augment(images[batch], self.cfg.augment, self.generator).to(self.device, non_blocking=True)
            x = ((raw - MNIST_MEAN) / MNIST_STD).contiguous(memory_format=torch.channels_last)
            y = labels[batch].to(self.device, non_blocking=True)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                logits = self.net(x)
                if self.teacher is None:
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
                else:
                    # The teacher sees the very same augmented batch, in its own 0..1 input space.
                    with torch.inference_mode():
                        teacher_logits = self.teacher(raw).float()
                    loss = distillation_loss(logits.float(), teacher_logits.clone(), y, self.cfg)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            scheduler.step()
            self.ema.update_parameters(self.net)
            total_loss += loss.item() * len(batch)
            total_correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(batch)
            bar.set_postfix(
                loss=f"{total_loss / seen:.4f}",
                acc=f"{100 * total_correct / seen:.2f}%",
                img_s=f"{seen / (time.perf_counter() - start):.0f}",
            )
        bar.close()
        return total_loss / max(seen, 1), total_correct / max(seen, 1)

    def ema_net(self) -> torch.nn.Module:
        """A copy of the EMA weights on the CPU, channels-last, in eval mode."""
        return copy.deepcopy(self.ema.module).to("cpu", memory_format=torch.channels_last).eval()


def _train_member(
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    member: int,
    epochs: int,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    history: list[EpochRecord],
    teacher: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, float]:
    """Train one network; return its final EMA weights and their validation accuracy.

    With a one-cycle schedule the last epochs run at the smallest learning rates, so the final
    average is the intended model; picking an epoch by validation would fit noise (v1 picked
    epoch 10 of 13 over a loss difference of 1.7e-6)."""
    train_x, train_y = train
    val_x, val_y = val
    trainer = _Trainer(cfg, device, generator, member, teacher)
    scheduler = trainer.schedule(-(-len(train_y) // cfg.batch_size), epochs)
    final: tuple[torch.nn.Module, float] | None = None
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        train_loss, train_acc = trainer.train_epoch(train_x, train_y, scheduler, epoch)
        candidate = trainer.ema_net()
        val_scores = score(predict_logits(ExportedModel([candidate]), val_x, cfg.eval_batch_size), val_y)
        record = EpochRecord(
            member=member,
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=train_acc,
            val_loss=val_scores.loss,
            val_accuracy=val_scores.accuracy,
            seconds=time.perf_counter() - epoch_start,
        )
        history.append(record)
        log.info(
            "model %d epoch %d: train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | %.0f s",
            member + 1,
            epoch,
            train_loss,
            100 * train_acc,
            val_scores.loss,
            100 * val_scores.accuracy,
            record.seconds,
        )
        final = (candidate, val_scores.accuracy)
    if final is None:
        raise ValueError("epochs must be at least 1")
    return final


def train_and_export(cfg: TrainConfig, mnist: Mnist, command: str, report: bool = True) -> Path:
    """Run the whole job on `mnist` and publish an artifact, its report included (unless
    `report` is false); returns the version directory."""
    started = time.perf_counter()
    git_commit = _git_commit()  # the code this run started with, not whatever is checked out at the end
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    val_size = min(cfg.val_size, cfg.dry_run_val_size) if cfg.dry_run else cfg.val_size
    train_split, val_split = split_train_val(mnist.train, min(val_size, len(mnist.train.labels) // 2), cfg.seed)
    test_split = mnist.test
    epochs = cfg.epochs
    if cfg.dry_run:
        train_split = _subset(train_split, cfg.dry_run_train_size)
        test_split = _subset(test_split, cfg.dry_run_test_size)
        epochs = 1
    log.info(
        "training %d model(s) on %d images, validating on %d, testing on %d; device %s, %d epochs each",
        cfg.members,
        len(train_split.labels),
        len(val_split.labels),
        len(test_split.labels),
        device,
        epochs,
    )

    train_x = images_to_tensor(train_split.images)
    train_y = torch.from_numpy(train_split.labels.astype(np.int64))
    if device.type == "cuda":
        train_x, train_y = train_x.pin_memory(), train_y.pin_memory()
    val_x = images_to_tensor(val_split.images)
    val_y = torch.from_numpy(val_split.labels.astype(np.int64))

    history: list[EpochRecord] = []
    members: list[torch.nn.Module] = []
    member_val_accuracy: list[float] = []
    teacher, teacher_metadata = None, None
    if cfg.teacher is not None:
        teacher, teacher_metadata = load_model(cfg.teacher, map_location=device)
        log.info("distilling from %s (%s, version %d)", cfg.teacher, teacher_metadata.name, teacher_metadata.version)
    for member in range(cfg.members):
        generator = seed_everything(member_seed(cfg.seed, member))
        net, val_accuracy = _train_member(
            cfg, device, generator, member, epochs, (train_x, train_y), (val_x, val_y), history, teacher
        )
        members.append(net)
        member_val_accuracy.append(val_accuracy)
    best_model = ExportedModel(members).eval()

    # Calibrate on validation; the test set is used once, for the final report.
    val_logits = predict_logits(best_model, val_x, cfg.eval_batch_size)
    temperature = fit_temperature(val_logits, val_y)
    val_scores = score(val_logits, val_y)
    test_logits = predict_logits(best_model, images_to_tensor(test_split.images), cfg.eval_batch_size)
    test_labels = torch.from_numpy(test_split.labels.astype(np.int64))
    test_scores = score(test_logits, test_labels)
    log.info("test accuracy %.2f%%, temperature %.3f", 100 * test_scores.accuracy, temperature)

    seconds = time.perf_counter() - started
    evaluation = Evaluation(
        test_accuracy=test_scores.accuracy,
        test_loss=test_scores.loss,
        per_class_accuracy=test_scores.per_class_accuracy,
        confusion_matrix=test_scores.confusion_matrix,
        val_accuracy=val_scores.accuracy,
        val_ece_before=expected_calibration_error(val_logits, val_y),
        val_ece_after=expected_calibration_error(val_logits / temperature, val_y),
    )
    training = {
        "config": cfg.to_dict(),
        "command": command,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "epochs_run": epochs,
        "members": cfg.members,
        "member_val_accuracy": member_val_accuracy,
        "bf16_autocast": use_bf16(device, cfg.amp),
        "teacher": None
        if teacher_metadata is None
        else {"path": str(cfg.teacher), "sha256": teacher_metadata.model_sha256},
        "seconds": seconds,
        "train_images": len(train_y),
        "val_images": len(val_y),
        "test_images": len(test_split.labels),
    }

    def build_metadata(version: int, sha256: str) -> ArtifactMetadata:
        return ArtifactMetadata(
            name=cfg.model_name,
            version=version,
            created_at=utc_now(),
            torch_version=torch.__version__,
            model_sha256=sha256,
            parameters=count_parameters(best_model),
            architecture={"class": "DigitNet", "members": cfg.members, **cfg.model.__dict__},
            temperature=temperature,
            evaluation=evaluation,
            training=training,
            history=history,
            dataset_sha256=mnist.sha256,
            git_commit=git_commit,
            smoke=cfg.dry_run,
        )

    example = torch.zeros(1, 1, 28, 28)

    def verify_export(directory: Path) -> None:
        """The exported file must reproduce the trained model's test logits before it is published."""
        with quiet_torchscript():
            exported = torch.jit.load(str(directory / "model.pt"))
        reloaded = predict_logits(exported, images_to_tensor(test_split.images), cfg.eval_batch_size)
        if (
            not torch.allclose(reloaded, test_logits, atol=1e-3)
            or score(reloaded, test_labels).accuracy != test_scores.accuracy
        ):
            raise ArtifactError("the exported TorchScript model does not reproduce the trained model's test results")

    version_dir = write_artifact(
        cfg.output_dir,
        cfg.model_name,
        lambda path: save_torchscript(best_model, path, example),
        build_metadata,
        verify=verify_export,
        finish=(lambda directory: write_report(directory, test_split)) if report else None,
    )
    log.info("artifact written to %s (%.1f min)", version_dir, seconds / 60)
    return version_dir
