"""Evaluation: logits, accuracy tables, temperature calibration and the artifact's report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI

import itertools

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from model_artifact import ArtifactError, ArtifactMetadata, load_model
from trainer.data import Split

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
ACCURACY_TOLERANCE = 0.0005  # a reloaded artifact must reproduce its claimed accuracy to 0.05 %


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in 0..1."""
    return torch.from_numpy(images.astype(np.float32)).unsqueeze(1).div_(255.0)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a module's tensors live. A frozen TorchScript module has no parameters left (they
    became constants), but it keeps buffers; with neither, the CPU."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000, device: torch.device | None = None
) -> torch.Tensor:
    """Logits of a model in eval mode for 0..1 images, computed in batches on `device`
    (default: the model's own)."""
    device = device or model_device(model)
    outputs = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outputs) if outputs else torch.empty(0, 10)


@dataclass(frozen=True)
class Scores:
    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]


def score(logits: torch.Tensor, labels: torch.Tensor) -> Scores:
    predictions = logits.argmax(dim=1)
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    confusion.index_put_((labels.long(), predictions), torch.ones_like(labels, dtype=torch.int64), accumulate=True)
    per_class_total = confusion.sum(dim=1).clamp(min=1)
    # Exact fractions in double precision: 9970/10000 must read 0.997, not float32's 0.99699998.
    return Scores(
        accuracy=int(confusion.trace()) / max(len(labels), 1),
        loss=float(F.cross_entropy(logits, labels.long())),
        per_class_accuracy=(confusion.diagonal().double() / per_class_total).tolist(),
        confusion_matrix=confusion.tolist(),
    )


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising negative log-likelihood on held-out data (Guo et al., 2017)."""
    logits = logits.detach().clone()  # may come from inference mode
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels.long())
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    probabilities = logits.softmax(dim=1)
    confidence, predictions = probabilities.max(dim=1)
    correct = (predictions == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)


# --- the report --------------------------------------------------------------------------


def _plot_confusion(confusion: list[list[int]], path: Path) -> None:
    matrix = np.array(confusion)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    shown = np.log1p(matrix)  # the diagonal dwarfs the errors on a linear scale
    ax.imshow(shown, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=7, color="white" if row == col else "black")
    ax.set(
        xticks=range(10),
        yticks=range(10),
        xlabel="predicted digit",
        ylabel="true digit",
        title="Confusion matrix (test set)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(metadata: ArtifactMetadata, path: Path, calibrated_test_loss: float) -> None:
    """Loss, and validation error on a log scale (99.6 % and 99.7 % look alike on a linear one);
    one colour per network."""
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    members = sorted({h.member for h in metadata.history})
    colours = plt.get_cmap("tab10")
    for member in members:
        history = [h for h in metadata.history if h.member == member]
        epochs = [h.epoch for h in history]
        name = f"network {member + 1}" if len(members) > 1 else "network"
        colour = colours(member % 10)
        ax_loss.plot(epochs, [h.train_loss for h in history], "o--", color=colour, label=f"{name}: train, augmented")
        ax_loss.plot(epochs, [h.val_loss for h in history], "o-", color=colour, label=f"{name}: validation")
        ax_err.plot(epochs, [max(100 * (1 - h.val_accuracy), 1e-2) for h in history], "o-", color=colour, label=name)
    ax_loss.axhline(
        calibrated_test_loss,
        color="black",
        linestyle=":",
        label=f"exported model, test, after calibration (T={metadata.temperature:.3f})",
    )
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss (T=1 unless marked)", yscale="log")
    ax_err.set(xlabel="epoch", ylabel="validation error (%)", title="Validation error", yscale="log")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def most_confident_errors(labels: np.ndarray, predictions: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Indices of the misclassified images, the most confidently wrong first."""
    wrong = np.flatnonzero(predictions != labels)
    return wrong[np.argsort(-confidence[wrong], kind="stable")]


def _plot_misclassified(
    images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, confidence: np.ndarray, path: Path
) -> None:
    """The misclassified digits, most confidently wrong first, with their calibrated confidence."""
    wrong = most_confident_errors(labels, predictions, confidence)
    shown = wrong[:60]
    cols = 10
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, shown, strict=False):
        ax.imshow(images[index], cmap="gray")
        ax.set_title(
            f"{labels[index]}→{predictions[index]} {100 * confidence[index]:.0f}%", fontsize=8, color="crimson"
        )
    fig.suptitle(
        f"Misclassified test digits: {len(wrong)} in all, {len(shown)} shown, most confident first "
        "(true→predicted, calibrated confidence)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(version_dir: Path, test: Split, out_dir: Path | None = None) -> Scores:
    """Load an artifact (checksum verified), evaluate it on `test` and write its report to
    `out_dir`. Only the trainer writes into a version directory, before it is published."""
    out_dir = out_dir or version_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    model, metadata = load_model(version_dir)
    logits = predict_logits(model, images_to_tensor(test.images))
    labels = torch.from_numpy(test.labels.astype(np.int64))
    scores = score(logits, labels)
    predictions = logits.argmax(dim=1).numpy()
    claimed = metadata.evaluation.test_accuracy
    if abs(scores.accuracy - claimed) > ACCURACY_TOLERANCE:
        raise ArtifactError(
            f"{version_dir}: measured test accuracy {scores.accuracy:.4%} differs from the claimed {claimed:.4%}"
        )
    _plot_confusion(scores.confusion_matrix, out_dir / "confusion_matrix.png")
    calibrated = logits / metadata.temperature
    _plot_curves(metadata, out_dir / "training_curves.png", float(F.cross_entropy(calibrated, labels)))
    confidence = calibrated.softmax(dim=1).max(dim=1).values.numpy()
    _plot_misclassified(test.images, test.labels, predictions, confidence, out_dir / "misclassified.png")
    # Calibration measured on the test set too: the temperature was fitted on validation, so
    # validation's figure alone would flatter it.
    test_ece = (
        expected_calibration_error(logits, labels),
        expected_calibration_error(logits / metadata.temperature, labels),
    )
    report = _report_markdown(metadata, scores, len(test.labels), test_ece)
    (out_dir / REPORT_FILE).write_text(report, encoding="utf-8")
    log.info("report written to %s", out_dir / REPORT_FILE)
    return scores


def _conversion_line(training: dict) -> str:
    source = training.get("converted_from")
    if not source:
        return ""
    return (
        f"\n- Converted from {source['name']} v{source['version']} ({source['precision']}) by `{source['command']}`: "
        f"{source['val_errors']} validation errors before, {source['val_errors_converted']} after"
    )


def _report_markdown(metadata: ArtifactMetadata, scores: Scores, n_test: int, test_ece: tuple[float, float]) -> str:
    ev = metadata.evaluation
    errors = sum(sum(row) for row in scores.confusion_matrix) - sum(scores.confusion_matrix[i][i] for i in range(10))
    rows = "\n".join(
        f"| {digit} | {sum(scores.confusion_matrix[digit])} | {100 * acc:.2f} % |"
        for digit, acc in enumerate(scores.per_class_accuracy)
    )
    training = metadata.training
    return f"""# {metadata.name} v{metadata.version}

- Test accuracy: **{100 * scores.accuracy:.2f} %** on {n_test} test images ({errors} errors); test loss {scores.loss:.4f}
- Validation accuracy: {100 * ev.val_accuracy:.2f} %
- Calibration: temperature {metadata.temperature:.3f} (fitted on validation); expected calibration error on the test set {100 * test_ece[0]:.2f} % before, {100 * test_ece[1]:.2f} % after (validation: {100 * ev.val_ece_before:.2f} % before, {100 * ev.val_ece_after:.2f} % after)
- Precision: {metadata.precision} (the accuracies above were measured in it)
- Parameters: {metadata.parameters:,}; torch {metadata.torch_version}; created {metadata.created_at:%Y-%m-%d %H:%M} UTC
- Training: {training.get("members", 1)} network(s) x {training.get("epochs_run")} epochs in {training.get("seconds", 0) / 60:.1f} min on {training.get("device")}, seed {training.get("config", {}).get("seed")}
- Command: `{training.get("command")}`{_conversion_line(training)}

| digit | test images | accuracy |
|---|---|---|
{rows}

![Training curves](training_curves.png)

![Confusion matrix](confusion_matrix.png)

![Misclassified test digits](misclassified.png)
"""
