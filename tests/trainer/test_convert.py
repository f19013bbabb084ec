"""`python -m trainer convert`: a float32 version republished in bfloat16 only if validation says
it keeps its accuracy; the test set is measured for the report, after the verdict."""

import json
from pathlib import Path

import pytest
import torch

from model_artifact import ArtifactError, list_versions, load_model, read_metadata, sha256_file
from trainer import convert
from trainer.__main__ import main as trainer_main
from trainer.convert import convert_precision
from trainer.data import load_mnist

REPO = Path(__file__).resolve().parents[2]
V1 = REPO / "artifacts" / "mnist-cnn" / "1"

pytestmark = pytest.mark.dataset


def test_convert_publishes_the_same_file_in_bfloat16_with_its_own_measurements(tmp_path: Path) -> None:
    assert trainer_main(["convert", str(V1), "--output-dir", str(tmp_path)]) == 0
    version_dir = tmp_path / "mnist-cnn" / "1"
    metadata = read_metadata(version_dir)
    source = read_metadata(V1)
    assert metadata.precision == "bfloat16"
    assert sha256_file(version_dir / "model.pt") == source.model_sha256  # same weights, other numerics
    converted = metadata.training["converted_from"]
    assert converted["version"] == 1 and converted["precision"] == "float32"
    assert converted["val_errors_converted"] <= converted["val_errors"] + 1
    assert metadata.evaluation.test_accuracy >= 0.997
    assert metadata.temperature != source.temperature  # refitted on validation in bfloat16
    report = (version_dir / "report.md").read_text()
    assert "Precision: bfloat16" in report and "Converted from mnist-cnn v1 (float32)" in report

    model, _ = load_model(version_dir)  # the loader runs it in bfloat16: logits close to, not equal to, float32
    reference, _ = load_model(V1)
    images = torch.rand(8, 1, 28, 28)
    with torch.inference_mode():
        ours, theirs = model(images), reference(images)
    assert ours.dtype == torch.float32
    assert not torch.equal(ours, theirs)
    assert torch.allclose(ours, theirs, atol=0.5)


def test_a_precision_that_loses_validation_accuracy_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Confused(torch.nn.Module):
        """Gets one image in ten wrong: what a precision too coarse for the model would do."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.inner(x)
            logits[::10] = logits[::10].roll(1, dims=1)
            return logits

    monkeypatch.setattr(convert, "in_precision", lambda model, precision: Confused(model))
    with pytest.raises(ArtifactError, match=r"loses accuracy on validation.*nothing published"):
        convert_precision(V1, "bfloat16", tmp_path, load_mnist(), "test")
    assert list_versions(tmp_path, "mnist-cnn") == []


def test_only_a_trained_float32_version_is_converted(tmp_path: Path) -> None:
    for index, change in enumerate(({"precision": "bfloat16"}, {"smoke": True})):
        source = tmp_path / str(index) / "mnist-cnn" / "1"
        source.mkdir(parents=True)
        (source / "model.pt").write_bytes((V1 / "model.pt").read_bytes())
        metadata = json.loads((V1 / "metadata.json").read_text()) | change
        (source / "metadata.json").write_text(json.dumps(metadata))
        expected = "already bfloat16" if "precision" in change else "smoke test"
        with pytest.raises(ArtifactError, match=expected):
            convert_precision(source, "bfloat16", tmp_path / "out", load_mnist(), "test")


def test_convert_refuses_when_the_rebuilt_validation_split_is_not_the_one_recorded(tmp_path: Path) -> None:
    source = tmp_path / "src" / "mnist-cnn" / "1"
    source.mkdir(parents=True)
    (source / "model.pt").write_bytes((V1 / "model.pt").read_bytes())
    metadata = json.loads((V1 / "metadata.json").read_text())
    metadata["training"]["config"]["seed"] = 7  # another split: the verdict would mean nothing
    (source / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ArtifactError, match="not the split it was chosen on"):
        convert_precision(source, "bfloat16", tmp_path / "out", load_mnist(), "test")
    assert list_versions(tmp_path / "out", "mnist-cnn") == []
