import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from model_artifact import list_versions, quiet_torchscript
from tests.trainer.idx import checksums, synthetic_mnist_files
from trainer.__main__ import main
from trainer.config import TrainConfig
from trainer.data import Mnist, Split, fetch_mnist, load_mnist
from trainer.evaluate import fit_temperature, most_confident_errors, predict_logits, write_report
from trainer.train import distillation_loss, member_seed, split_train_val, train_and_export, warmup_ema


class _Files:
    description = "synthetic"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def fetch(self, names: list[str]) -> dict[str, bytes]:
        return {name: self.files[name] for name in names}


@pytest.fixture
def synthetic_mnist(tmp_path: Path) -> Mnist:
    files = synthetic_mnist_files(n_train=300, n_test=64)
    return load_mnist(tmp_path / "data", [_Files(files)], checksums(files))


def test_dry_run_produces_a_loadable_torchscript_artifact(tmp_path: Path, synthetic_mnist: Mnist) -> None:
    cfg = TrainConfig(output_dir=tmp_path / "artifacts", dry_run=True, val_size=100, seed=3, members=2)
    version_dir = train_and_export(cfg, synthetic_mnist, "python -m trainer train --dry-run")
    assert version_dir == tmp_path / "artifacts" / "mnist-cnn" / "1"

    with quiet_torchscript():
        scripted = torch.jit.load(str(version_dir / "model.pt"))
    logits = scripted(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5, 10)
    assert logits.dtype == torch.float32

    metadata = json.loads((version_dir / "metadata.json").read_text())
    assert metadata["name"] == "mnist-cnn"
    assert metadata["version"] == 1
    assert metadata["training"]["command"] == "python -m trainer train --dry-run"
    assert metadata["training"]["config"]["seed"] == 3
    assert metadata["training"]["epochs_run"] == 1
    assert metadata["training"]["members"] == 2
    assert metadata["architecture"]["members"] == 2
    assert metadata["smoke"] is True  # a dry run is marked, so nothing serves it by mistake
    assert metadata["precision"] == "float32"
    assert [(h["member"], h["epoch"]) for h in metadata["history"]] == [(0, 1), (1, 1)]
    assert set(metadata["dataset_sha256"]) == set(synthetic_mnist.sha256)
    assert metadata["temperature"] > 0
    assert len(metadata["evaluation"]["confusion_matrix"]) == 10

    scores = write_report(version_dir, Split(synthetic_mnist.test.images[:512], synthetic_mnist.test.labels[:512]))
    assert scores.accuracy == pytest.approx(metadata["evaluation"]["test_accuracy"], abs=5e-4)
    for name in ("report.md", "confusion_matrix.png", "training_curves.png", "misclassified.png"):
        assert (version_dir / name).stat().st_size > 0


def test_same_seed_gives_the_same_weights(tmp_path: Path, synthetic_mnist: Mnist) -> None:
    outputs = []
    for run in ("a", "b"):
        cfg = TrainConfig(output_dir=tmp_path / run, dry_run=True, val_size=100, seed=11, threads=1)
        version_dir = train_and_export(cfg, synthetic_mnist, "test")
        with quiet_torchscript():
            model = torch.jit.load(str(version_dir / "model.pt"))
        outputs.append(model(torch.linspace(0, 1, 784).reshape(1, 1, 28, 28)))
    assert torch.allclose(outputs[0], outputs[1])


def test_validation_split_is_disjoint_and_seeded() -> None:
    labels = np.arange(100) % 10
    images = np.zeros((100, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(100)  # every image unique
    split = Split(images, labels.astype(np.uint8))
    train, val = split_train_val(split, 20, seed=5)
    _train_b, val_b = split_train_val(split, 20, seed=5)
    assert len(train.labels) == 80
    assert len(val.labels) == 20
    assert np.array_equal(val.images, val_b.images)
    train_keys = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in train_keys for img in val.images)


def test_temperature_fit_softens_overconfident_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    logits = torch.randn(2000, 10, generator=generator)
    logits[torch.arange(2000), labels] += 2.0
    overconfident = logits * 5  # same ranking, five times too sure of itself
    base, fitted = fit_temperature(logits, labels), fit_temperature(overconfident, labels)
    assert fitted == pytest.approx(5 * base, rel=0.02)
    nll = torch.nn.functional.cross_entropy
    assert nll(overconfident / fitted, labels) < nll(overconfident, labels)


def test_cli_help_documents_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    for command in ("fetch", "train", "evaluate"):
        assert command in out


def test_cli_dry_run_trains_and_reports(
    tmp_path: Path, synthetic_mnist: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Route the CLI's loader to the synthetic files; everything else is the real path.
    import trainer.__main__ as cli

    monkeypatch.setattr(cli, "load_mnist", lambda data_dir: synthetic_mnist)
    status = main(["train", "--dry-run", "--output-dir", str(tmp_path), "--model-name", "smoke", "--seed", "1"])
    assert status == 0
    assert list_versions(tmp_path, "smoke") == [1]
    assert (tmp_path / "smoke" / "1" / "report.md").exists()
    published = {p.name: p.read_bytes() for p in (tmp_path / "smoke" / "1").iterdir()}
    reports = tmp_path / "reports"
    assert main(["evaluate", "--output-dir", str(tmp_path), "--model-name", "smoke", "--report-dir", str(reports)]) == 0
    assert (reports / "smoke" / "1" / "report.md").exists()
    # evaluate never rewrites a published version
    assert {p.name: p.read_bytes() for p in (tmp_path / "smoke" / "1").iterdir()} == published


def test_cli_evaluate_reports_a_missing_model_as_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["evaluate", "--output-dir", str(tmp_path), "--model-name", "absent"]) == 1
    assert "no versions of model 'absent'" in caplog.text


def test_cli_fetch_reports_unreachable_data_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import trainer.__main__ as cli

    monkeypatch.setattr(cli, "fetch_mnist", lambda data_dir: fetch_mnist(data_dir, []))
    assert main(["fetch", "--data-dir", str(tmp_path)]) == 1
    assert f"Place these files in {tmp_path}" in caplog.text


def test_skip_existing_exits_at_once_when_a_valid_artifact_exists(
    tmp_path: Path, synthetic_mnist: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.__main__ as cli

    monkeypatch.setattr(cli, "load_mnist", lambda data_dir: synthetic_mnist)
    args = ["train", "--dry-run", "--output-dir", str(tmp_path), "--model-name", "once", "--skip-existing"]
    args.append("--allow-smoke")  # dry runs stand in for trained models here
    assert main(args) == 0
    assert main(args) == 0
    assert list_versions(tmp_path, "once") == [1]  # the second run trained nothing
    with (tmp_path / "once" / "1" / "model.pt").open("ab") as f:
        f.write(b"corrupt")
    assert main(args) == 0
    assert list_versions(tmp_path, "once") == [1, 2]  # a broken artifact does not count


def test_skip_existing_does_not_accept_a_dry_run_as_a_model(
    tmp_path: Path, synthetic_mnist: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.__main__ as cli

    monkeypatch.setattr(cli, "load_mnist", lambda data_dir: synthetic_mnist)
    args = ["train", "--dry-run", "--output-dir", str(tmp_path), "--model-name", "once", "--skip-existing"]
    assert main(args) == 0
    assert main(args) == 0
    assert list_versions(tmp_path, "once") == [1, 2]  # the smoke artifact was not taken for a model


def test_dry_run_is_written_apart_from_real_models_by_default(
    tmp_path: Path, synthetic_mnist: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.__main__ as cli

    monkeypatch.setattr(cli, "load_mnist", lambda data_dir: synthetic_mnist)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dry-run", "--no-report"]) == 0
    assert not (tmp_path / "artifacts").exists()
    assert list_versions(tmp_path / cli.DRY_RUN_OUTPUT_DIR, "mnist-cnn") == [1]


@pytest.mark.parametrize("option", ["--members", "--epochs", "--batch-size"])
def test_cli_refuses_zero_counts_before_loading_data(
    option: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import trainer.__main__ as cli

    monkeypatch.setattr(cli, "load_mnist", lambda data_dir: pytest.fail("MNIST loaded despite a bad option"))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", option, "0"])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def test_cli_refuses_cuda_without_a_gpu_before_loading_data(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import trainer.__main__ as cli

    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    monkeypatch.setattr(cli, "load_mnist", lambda data_dir: pytest.fail("MNIST loaded before the device check"))
    assert main(["train", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in caplog.text


def test_training_logs_have_no_progress_bars_off_a_terminal(
    tmp_path: Path, synthetic_mnist: Mnist, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = TrainConfig(output_dir=tmp_path, dry_run=True, val_size=100)
    train_and_export(cfg, synthetic_mnist, "test")
    err = capsys.readouterr().err
    assert "batch/s" not in err
    assert "\r" not in err


def test_members_of_neighbouring_seeds_get_different_streams() -> None:
    streams = {member_seed(seed, member) for seed in range(1230, 1240) for member in range(4)}
    assert len(streams) == 40  # --seed 1235 net 1 is not --seed 1234 net 2


def test_ema_follows_the_network_early_instead_of_its_initial_weights() -> None:
    net = torch.nn.Linear(4, 4)
    ema = AveragedModel(net, multi_avg_fn=warmup_ema(0.999), use_buffers=True)
    ema.update_parameters(net)  # the first update copies the (near-random) starting weights
    with torch.no_grad():
        net.weight.add_(1.0)  # what the first few hundred steps of training do
    for _ in range(3):
        ema.update_parameters(net)
    moved = float((ema.module.weight - (net.weight - 1.0)).mean().detach())
    assert moved > 0.5  # a fixed 0.999 decay moves 0.1 % per step


def test_distillation_loss_is_label_loss_when_the_student_matches_the_teacher() -> None:
    logits = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    cfg = TrainConfig(distill_weight=0.5, label_smoothing=0.0)
    expected = 0.5 * torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(distillation_loss(logits, logits, labels, cfg), expected, atol=1e-6)
    assert distillation_loss(logits, -logits, labels, cfg) > expected


def test_dry_run_distils_from_a_teacher_artifact(tmp_path: Path, synthetic_mnist: Mnist) -> None:
    teacher_dir = train_and_export(
        TrainConfig(output_dir=tmp_path / "t", dry_run=True, val_size=100), synthetic_mnist, "t"
    )
    cfg = TrainConfig(output_dir=tmp_path / "s", dry_run=True, val_size=100, teacher=teacher_dir)
    metadata = json.loads((train_and_export(cfg, synthetic_mnist, "s") / "metadata.json").read_text())
    assert metadata["training"]["teacher"]["path"] == str(teacher_dir)
    assert metadata["training"]["config"]["teacher"] == str(teacher_dir)


def test_predict_logits_runs_where_a_module_without_parameters_lives() -> None:
    class Frozen(torch.nn.Module):  # like a frozen TorchScript module: buffers, no parameters
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(1, device="meta"))
            self.seen: list[torch.device] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(x.device)
            return torch.zeros(x.shape[0], 10)

    model = Frozen()
    predict_logits(model, torch.zeros(3, 1, 28, 28))
    assert model.seen == [torch.device("meta")]


def test_gallery_shows_the_most_confident_errors_first() -> None:
    labels = np.array([1, 2, 3, 4, 5])
    predictions = np.array([1, 7, 3, 9, 8])
    confidence = np.array([0.99, 0.40, 0.95, 0.90, 0.60])
    assert most_confident_errors(labels, predictions, confidence).tolist() == [3, 4, 1]


def test_a_version_is_published_with_its_report_or_not_at_all(
    tmp_path: Path, synthetic_mnist: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.train

    def crash(*args: object) -> None:
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(trainer.train, "write_report", crash)
    with pytest.raises(RuntimeError, match="plotting failed"):
        train_and_export(TrainConfig(output_dir=tmp_path, dry_run=True, val_size=100), synthetic_mnist, "t")
    assert list_versions(tmp_path, "mnist-cnn") == []
