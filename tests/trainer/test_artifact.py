import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model_artifact import (
    METADATA_FILE,
    MODEL_FILE,
    ArtifactError,
    ArtifactMetadata,
    check_servable,
    find_valid_version,
    list_versions,
    load_model,
    read_metadata,
    resolve_version_dir,
    save_torchscript,
    write_artifact,
)
from tests.helpers import make_metadata
from trainer.model import DigitNet, ExportedModel


def write_model(path: Path) -> None:
    save_torchscript(ExportedModel([DigitNet()]), path, torch.zeros(1, 1, 28, 28))


def test_published_versions_are_readable_by_other_users(tmp_path: Path) -> None:
    version_dir = write_artifact(tmp_path, "tiny", write_model, make_metadata)
    assert version_dir.stat().st_mode & 0o055 == 0o055  # group and others may list and read it


def test_versions_increase_monotonically(tmp_path: Path) -> None:
    first = write_artifact(tmp_path, "tiny", write_model, make_metadata)
    second = write_artifact(tmp_path, "tiny", write_model, make_metadata)
    assert (first.name, second.name) == ("1", "2")
    assert list_versions(tmp_path, "tiny") == [1, 2]
    assert resolve_version_dir(tmp_path, "tiny") == second
    assert resolve_version_dir(tmp_path, "tiny", 1) == first


def test_written_artifact_loads_and_maps_images_to_ten_logits(tmp_path: Path) -> None:
    version_dir = write_artifact(tmp_path, "tiny", write_model, make_metadata)
    model, metadata = load_model(version_dir)
    assert metadata.version == 1
    assert metadata.temperature == 1.0
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    # The metadata on disk is plain JSON that any client can read.
    on_disk = json.loads((version_dir / METADATA_FILE).read_text())
    assert on_disk["schema_version"] == 1
    assert on_disk["input"]["shape"] == [None, 1, 28, 28]
    assert on_disk["input"]["polarity"] == "white-on-black"


def test_crash_while_writing_leaves_no_visible_version(tmp_path: Path) -> None:
    def crash(path: Path) -> None:
        path.write_bytes(b"half a model")
        raise KeyboardInterrupt  # as if the job were killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_artifact(tmp_path, "tiny", crash, make_metadata)
    assert list_versions(tmp_path, "tiny") == []
    assert list((tmp_path / "tiny").iterdir()) == []  # the temporary directory is gone too


def test_metadata_that_lies_about_the_checksum_is_refused_before_publishing(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="must use the version and checksum"):
        write_artifact(
            tmp_path, "tiny", write_model, lambda version, _sha: make_metadata(version, "0" * 64, name="tiny")
        )
    assert list_versions(tmp_path, "tiny") == []


def test_tampered_model_file_is_refused(tmp_path: Path) -> None:
    version_dir = write_artifact(tmp_path, "tiny", write_model, make_metadata)
    with (version_dir / MODEL_FILE).open("ab") as f:
        f.write(b"\x00")
    with pytest.raises(ArtifactError, match="SHA-256 mismatch"):
        load_model(version_dir)


def test_corrupt_model_file_with_matching_checksum_is_a_clear_error(tmp_path: Path) -> None:
    def garbage(path: Path) -> None:
        path.write_bytes(b"not a torchscript archive")

    version_dir = write_artifact(tmp_path, "tiny", garbage, make_metadata)
    with pytest.raises(ArtifactError, match="cannot be loaded as TorchScript"):
        load_model(version_dir)


def test_missing_files_are_named(tmp_path: Path) -> None:
    version_dir = write_artifact(tmp_path, "tiny", write_model, make_metadata)
    (version_dir / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"model\.pt: missing"):
        load_model(version_dir)
    (version_dir / METADATA_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"metadata\.json: missing"):
        load_model(version_dir)


def test_metadata_schema_rejects_unknown_fields_and_bad_values(tmp_path: Path) -> None:
    good = make_metadata(1, "a" * 64).model_dump(mode="json")
    ArtifactMetadata.model_validate(good)
    with pytest.raises(ValidationError, match="surprise"):
        ArtifactMetadata.model_validate({**good, "surprise": 1})
    with pytest.raises(ValidationError, match="model_sha256"):
        ArtifactMetadata.model_validate({**good, "model_sha256": "xyz"})
    with pytest.raises(ValidationError, match="temperature"):
        ArtifactMetadata.model_validate({**good, "temperature": 0})
    with pytest.raises(ValidationError, match="schema_version"):
        ArtifactMetadata.model_validate({**good, "schema_version": 99})

    version_dir = write_artifact(tmp_path, "tiny", write_model, make_metadata)
    (version_dir / METADATA_FILE).write_text(json.dumps({**good, "labels": ["x"]}))
    with pytest.raises(ArtifactError, match="does not match the metadata schema"):
        load_model(version_dir)


def test_unknown_model_or_version_is_named(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no versions of model 'nope'"):
        resolve_version_dir(tmp_path, "nope")
    write_artifact(tmp_path, "tiny", write_model, make_metadata)
    with pytest.raises(ArtifactError, match="has no version 7"):
        resolve_version_dir(tmp_path, "tiny", 7)


def test_invalid_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="invalid model name"):
        write_artifact(tmp_path, "../escape", write_model, make_metadata)


def test_a_failed_verification_publishes_nothing(tmp_path: Path) -> None:
    def reject(directory: Path) -> None:
        assert (directory / MODEL_FILE).exists()
        raise ArtifactError("exported model does not reproduce the trained one")

    with pytest.raises(ArtifactError, match="does not reproduce"):
        write_artifact(tmp_path, "tiny", write_model, make_metadata, verify=reject)
    assert list_versions(tmp_path, "tiny") == []
    assert list((tmp_path / "tiny").iterdir()) == []


def test_v1_metadata_still_loads_with_the_new_fields_defaulted() -> None:
    metadata = read_metadata(Path(__file__).resolve().parents[2] / "artifacts" / "mnist-cnn" / "1")
    assert metadata.precision == "float32"
    assert metadata.smoke is False
    check_servable(metadata)


def test_smoke_artifact_is_refused_unless_asked_for(tmp_path: Path) -> None:
    def real(version: int, sha256: str) -> ArtifactMetadata:
        return make_metadata(version, sha256, name="m")

    def smoke(version: int, sha256: str) -> ArtifactMetadata:
        return make_metadata(version, sha256, name="m").model_copy(update={"smoke": True})

    first = write_artifact(tmp_path, "m", write_model, real)
    newest = write_artifact(tmp_path, "m", write_model, smoke)
    with pytest.raises(ArtifactError, match="--dry-run smoke test"):
        check_servable(read_metadata(newest))
    check_servable(read_metadata(newest), allow_smoke=True)
    assert find_valid_version(tmp_path, "m") == first
    assert find_valid_version(tmp_path, "m", allow_smoke=True) == newest
