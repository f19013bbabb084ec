"""The committed default model: intact, loadable, and as accurate as its metadata claims."""

from pathlib import Path

import numpy as np
import pytest
import torch

from model_artifact import list_versions, load_model, resolve_version_dir, sha256_file
from trainer.data import load_mnist
from trainer.evaluate import ACCURACY_TOLERANCE, images_to_tensor, predict_logits, score

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
MODEL_NAME = "mnist-cnn"


@pytest.fixture(scope="module")
def default_model() -> tuple[torch.nn.Module, object]:
    return load_model(resolve_version_dir(ARTIFACTS, MODEL_NAME))


def test_a_default_model_is_committed() -> None:
    assert list_versions(ARTIFACTS, MODEL_NAME), "artifacts/mnist-cnn/<version>/ is missing"


def test_default_model_checksum_matches_its_metadata(default_model) -> None:
    _, metadata = default_model
    version_dir = resolve_version_dir(ARTIFACTS, MODEL_NAME)
    assert sha256_file(version_dir / "model.pt") == metadata.model_sha256
    assert (version_dir / "model.pt").stat().st_size < 4 * 1024 * 1024  # small enough for git


def test_default_model_meets_the_accuracy_target(default_model) -> None:
    _, metadata = default_model
    confusion = metadata.evaluation.confusion_matrix
    errors = sum(map(sum, confusion)) - sum(confusion[d][d] for d in range(10))
    assert sum(map(sum, confusion)) == 10_000
    assert errors <= 30  # at least 99.70 % on the official test set


@pytest.mark.dataset
def test_default_model_reproduces_its_claimed_accuracy_on_the_real_test_set(default_model) -> None:
    model, metadata = default_model
    mnist = load_mnist()  # the trainer's own fetcher; cached after the first run
    assert metadata.dataset_sha256 == mnist.sha256
    logits = predict_logits(model, images_to_tensor(mnist.test.images))
    scores = score(logits, torch.from_numpy(mnist.test.labels.astype(np.int64)))
    assert abs(scores.accuracy - metadata.evaluation.test_accuracy) <= ACCURACY_TOLERANCE
    if metadata.precision == "float32":
        assert scores.confusion_matrix == metadata.evaluation.confusion_matrix
    else:  # bfloat16 kernels differ by instruction set: a borderline digit may flip on other hardware
        changed = sum(
            abs(a - b)
            for row, claimed in zip(scores.confusion_matrix, metadata.evaluation.confusion_matrix, strict=True)
            for a, b in zip(row, claimed, strict=True)
        )
        assert changed <= 4
