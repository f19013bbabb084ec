"""The model artifact: `<root>/<name>/<version>/{model.pt, metadata.json}`.

The contract between the trainer (which writes artifacts) and the service (which reads them):
the metadata schema (`schema`), the versioned directory layout with atomic publishing and
checksum verification (`store`), and the one function that loads a model file (`torchscript`).
It imports neither training nor dataset code, so the service can depend on it alone.
"""

from model_artifact.schema import (
    METADATA_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    ArtifactMetadata,
    EpochRecord,
    Evaluation,
    InputSpec,
    OutputSpec,
    Precision,
    utc_now,
)
from model_artifact.store import (
    ArtifactError,
    check_servable,
    find_valid_version,
    list_versions,
    read_metadata,
    resolve_version_dir,
    sha256_file,
    verify_model_file,
    write_artifact,
)
from model_artifact.torchscript import in_precision, load_model, quiet_torchscript, save_torchscript

__all__ = [
    "METADATA_FILE",
    "MODEL_FILE",
    "SCHEMA_VERSION",
    "ArtifactError",
    "ArtifactMetadata",
    "EpochRecord",
    "Evaluation",
    "InputSpec",
    "OutputSpec",
    "Precision",
    "check_servable",
    "find_valid_version",
    "in_precision",
    "list_versions",
    "load_model",
    "quiet_torchscript",
    "read_metadata",
    "resolve_version_dir",
    "save_torchscript",
    "sha256_file",
    "utc_now",
    "verify_model_file",
    "write_artifact",
]
