"""Publish a trained float32 version in a cheaper precision, if it keeps its accuracy.

The new version holds the same model file with `precision` set in its metadata, so every loader
runs it in that precision (see `model_artifact.torchscript`). It is judged on the validation
images the source version was selected and calibrated on: it may make at most
`max_extra_val_errors` more mistakes there than in float32, or nothing is published. Only then
is the test set read, once, for the new version's report. The temperature is refitted on
validation in the new precision.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from model_artifact import (
    MODEL_FILE,
    ArtifactError,
    ArtifactMetadata,
    Evaluation,
    Precision,
    in_precision,
    load_model,
    sha256_file,
    utc_now,
    write_artifact,
)
from trainer.data import Mnist
from trainer.evaluate import (
    expected_calibration_error,
    fit_temperature,
    images_to_tensor,
    predict_logits,
    score,
    write_report,
)
from trainer.train import split_train_val

log = logging.getLogger(__name__)


def _errors(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(dim=1) != labels).sum())


def convert_precision(
    source_dir: Path,
    precision: Precision,
    output_dir: Path,
    mnist: Mnist,
    command: str,
    *,
    max_extra_val_errors: int = 1,
    report: bool = True,
) -> Path:
    """Publish `source_dir`'s model in `precision` as a new version under `output_dir`; returns it."""
    started = time.perf_counter()
    model, source = load_model(source_dir)
    if source.precision != "float32":
        raise ArtifactError(f"{source_dir} is already {source.precision}; convert from a float32 version")
    if source.smoke:
        raise ArtifactError(f"{source_dir} is a --dry-run smoke test; convert a trained model")
    converted = in_precision(model, precision)
    if max_extra_val_errors < 0:
        raise ArtifactError("max_extra_val_errors must be 0 or more")
    config = source.training.get("config", {})
    if "seed" not in config or "val_size" not in config:
        raise ArtifactError(f"{source_dir}: its metadata does not say which validation split it was chosen on")
    _, val = split_train_val(mnist.train, int(config["val_size"]), int(config["seed"]))
    val_x, val_y = images_to_tensor(val.images), torch.from_numpy(val.labels.astype(np.int64))

    with torch.inference_mode():
        reference = predict_logits(model, val_x)
        val_logits = predict_logits(converted, val_x)
    reference_errors, errors = _errors(reference, val_y), _errors(val_logits, val_y)
    recorded = round((1.0 - source.evaluation.val_accuracy) * len(val_y))
    if reference_errors != recorded:
        raise ArtifactError(
            f"{source_dir}: the rebuilt validation split gives {reference_errors} errors in float32, but the "
            f"metadata records {recorded}: not the split it was chosen on, so it cannot judge the conversion"
        )
    log.info(
        "validation errors: %d in float32, %d in %s (of %d images)", reference_errors, errors, precision, len(val_y)
    )
    if errors > reference_errors + max_extra_val_errors:
        raise ArtifactError(
            f"{precision} loses accuracy on validation: {errors} errors against {reference_errors} in float32 "
            f"(at most {max_extra_val_errors} more allowed); nothing published"
        )
    temperature = fit_temperature(val_logits, val_y)

    # The validation verdict is in; the test set is read once, for the report.
    test_y = torch.from_numpy(mnist.test.labels.astype(np.int64))
    with torch.inference_mode():
        test_logits = predict_logits(converted, images_to_tensor(mnist.test.images))
    test_scores = score(test_logits, test_y)
    val_scores = score(val_logits, val_y)
    log.info("%s test accuracy %.2f%%", precision, 100 * test_scores.accuracy)
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
        **source.training,
        "converted_from": {
            "path": str(source_dir),
            "name": source.name,
            "version": source.version,
            "sha256": source.model_sha256,
            "precision": source.precision,
            "val_errors": reference_errors,
            "val_errors_converted": errors,
            "command": command,
            "seconds": time.perf_counter() - started,
        },
    }

    def build_metadata(version: int, sha256: str) -> ArtifactMetadata:
        return source.model_copy(
            update={
                "version": version,
                "created_at": utc_now(),
                "torch_version": torch.__version__,
                "model_sha256": sha256,
                "precision": precision,
                "temperature": temperature,
                "evaluation": evaluation,
                "training": training,
            }
        )

    def verify_copy(directory: Path) -> None:
        if sha256_file(directory / MODEL_FILE) != source.model_sha256:
            raise ArtifactError("the copied model file differs from the source version's")

    version_dir = write_artifact(
        output_dir,
        source.name,
        lambda path: shutil.copyfile(source_dir / MODEL_FILE, path),
        build_metadata,
        verify=verify_copy,
        finish=(lambda directory: write_report(directory, mnist.test)) if report else None,
    )
    log.info("%s version written to %s", precision, version_dir)
    return version_dir
