"""TorchServe on the same TorchScript model: a model archive, a config, and the command that serves them.

Everything TorchServe writes (logs, metrics logs, config snapshots, its pid file, the workers' sockets)
goes into the run's temporary directory; every listener it opens is on 127.0.0.1 and a free port."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.procs import HOST, free_port

MODEL_NAME = "mnist-cnn"
HANDLER = Path(__file__).with_name("ts_handler.py")
BATCH_SIZE = 32
MAX_BATCH_DELAY_MS = 5
WORKERS = 2


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the bench extra installs them there)."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def build_archive(model_dir: Path, store: Path, work: Path) -> str:
    """`<store>/mnist-cnn.mar` from the artifact's model.pt and metadata.json (for the temperature);
    returns the archive's version (the artifact's)."""
    staging = work / "archive-src"
    staging.mkdir(parents=True, exist_ok=True)
    handler = shutil.copy(HANDLER, staging / "ts_handler.py")
    store.mkdir(parents=True, exist_ok=True)
    version = json.loads((model_dir / "metadata.json").read_text())["version"]
    options = {
        "--model-name": MODEL_NAME,
        "--version": str(version),
        "--serialized-file": str(model_dir / "model.pt"),
        "--handler": str(handler),
        "--extra-files": str(model_dir / "metadata.json"),
        "--export-path": str(store),
    }
    command = [_bin("torch-model-archiver"), *(word for pair in options.items() for word in pair), "--force"]
    subprocess.run(command, check=True, timeout=120, capture_output=True)
    return str(version)


@dataclass
class TorchServeConfig:
    inference_port: int
    management_port: int
    config_path: Path

    @property
    def predict_url(self) -> str:
        return f"http://{HOST}:{self.inference_port}/predictions/{MODEL_NAME}"

    @property
    def model_url(self) -> str:
        return f"http://{HOST}:{self.management_port}/models/{MODEL_NAME}"


def write_config(work: Path, store: Path, version: str) -> TorchServeConfig:
    inference, management, metrics, grpc_inference, grpc_management, worker = (free_port() for _ in range(6))
    models = {
        MODEL_NAME: {
            version: {
                "defaultVersion": True,
                "marName": f"{MODEL_NAME}.mar",
                "minWorkers": WORKERS,
                "maxWorkers": WORKERS,
                "batchSize": BATCH_SIZE,
                "maxBatchDelay": MAX_BATCH_DELAY_MS,
            }
        }
    }
    properties = {
        "inference_address": f"http://{HOST}:{inference}",
        "management_address": f"http://{HOST}:{management}",
        "metrics_address": f"http://{HOST}:{metrics}",
        "grpc_inference_address": HOST,
        "grpc_management_address": HOST,
        "grpc_inference_port": grpc_inference,
        "grpc_management_port": grpc_management,
        "initial_worker_port": worker,
        "model_store": str(store),
        "load_models": f"{MODEL_NAME}.mar",
        "models": json.dumps(models),
        "default_workers_per_model": WORKERS,
        "disable_token_authorization": "true",  # on by default since 0.11; the other servers have none either
        "enable_metrics_api": "false",
        "disable_system_metrics": "true",
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
    }
    path = work / "config.properties"
    path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()), encoding="utf-8")
    return TorchServeConfig(inference, management, path)


def command(config: TorchServeConfig, store: Path) -> list[str]:
    paths = ["--ts-config", str(config.config_path), "--model-store", str(store)]
    return [_bin("torchserve"), "--foreground", *paths, "--disable-token-auth", "--no-config-snapshots"]


def environment(base: dict[str, str], work: Path, temp: Path) -> dict[str, str]:
    """TorchServe writes its logs under LOG_LOCATION/METRICS_LOCATION (else ./logs), its pid file and the
    workers' Unix sockets into the temp directory (TMPDIR for Python, TEMP for the JVM)."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return {
        **base,
        "LOG_LOCATION": str(logs),
        "METRICS_LOCATION": str(logs),
        "TMPDIR": str(temp),
        "TEMP": str(temp),
        "OMP_NUM_THREADS": "1",  # 1 thread per worker, also for anything that starts before the handler
        "MKL_NUM_THREADS": "1",
    }


def workers_ready(config: TorchServeConfig) -> bool:
    """True once the management API lists WORKERS workers of the model, all READY."""
    try:
        with urllib.request.urlopen(config.model_url, timeout=2) as response:
            described = json.loads(response.read())
    except (OSError, ValueError):
        return False
    workers = described[0].get("workers", []) if described else []
    return len(workers) == WORKERS and all(w.get("status") == "READY" for w in workers)
