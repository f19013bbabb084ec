"""Service settings: one typed class, read from DIGIT_* environment variables."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "DIGIT_"


class Settings(BaseSettings):
    """Every knob of the service. Invalid values stop start-up with a message naming them."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", protected_namespaces=())

    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    artifact_dir: Path = Field(Path("artifacts"), description="root of artifacts/<model>/<version>/")
    model_name: str = Field("mnist-cnn", description="which model under artifact_dir to serve")
    model_version: int | None = Field(None, ge=1, description="version to serve; unset: the newest")
    allow_smoke_models: bool = Field(
        False, description="serve a trainer --dry-run smoke artifact (refused by default: it is no real model)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU")
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="worker processes, each with its own model and batcher; "
        "0: one per CPU the service may use (1 on a GPU)",
    )
    cpu_threads: int | None = Field(
        None, ge=1, le=256, description="torch intra-op threads per worker; unset: the CPUs shared among the workers"
    )
    max_batch_size: int = Field(64, ge=1, le=4096, description="most images in one forward pass")
    max_batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest a batch waits to fill, in ms")
    queue_limit: int = Field(2048, ge=1, description="most images waiting; beyond it requests get 429")
    max_queue_delay_ms: float = Field(
        75.0,
        gt=0,
        le=60_000,
        description="admit a request only while the work queued ahead of it takes at most this long, in ms; "
        "beyond it requests get 429",
    )
    refusal_pause_ms: float = Field(
        100.0,
        ge=0,
        le=10_000,
        description="a request refused for overload gets its 429 after this pause (no CPU spent), so clients that "
        "retry at once cannot spend the CPU that serving needs on refusals; 0: at once",
    )
    request_timeout_s: float = Field(10.0, gt=0, le=600, description="longest a request waits for its result")
    reload_interval_s: float = Field(
        10.0, ge=0, le=3600, description="how often to look for a newer model version, in s; 0: only on admin reload"
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        le=300,
        description="after SIGTERM, keep serving this long with readiness 503, so load balancers stop sending first",
    )
    max_instances: int = Field(256, ge=1, le=100_000, description="most images in one JSON request")
    max_files: int = Field(16, ge=1, le=1000, description="most images in one multipart upload")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body, in bytes")
    body_timeout_s: float = Field(
        30.0, gt=0, le=600, description="longest a client may take to send its body (slow clients get 408)"
    )
    max_image_pixels: int = Field(16_000_000, ge=784, description="largest decoded image (width x height)")
    max_preprocess_side: int = Field(4096, ge=28, description="largest pixel array side with preprocess=true")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins, comma-separated; empty: CORS closed"
    )
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="bearer tokens for the prediction routes, comma-separated; empty: open"
    )
    api_tokens_file: Path | None = Field(None, description="file of prediction tokens, one per line (a mounted Secret)")
    admin_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="bearer tokens for the admin routes (reload), comma-separated; empty: closed"
    )
    admin_tokens_file: Path | None = Field(None, description="file of admin tokens, one per line (a mounted Secret)")
    metrics_require_token: bool = Field(False, description="require an admin token for /metrics too")
    metrics_enabled: bool = Field(True, description="serve Prometheus metrics at /metrics")
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry (traces, metrics, logs to the globally configured providers); "
        "off by default, as looking for providers costs every request",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="text for people, json for log pipelines")

    @field_validator("cors_origins", "api_tokens", "admin_tokens", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("log_level", "log_format", "device", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _limits_fit(self) -> Settings:
        largest_request = max(self.max_instances, self.max_files)
        if self.queue_limit < largest_request:
            raise ValueError(
                f"queue_limit ({self.queue_limit}) must be at least max_instances and max_files ({largest_request}), "
                "or a legal request could never be queued"
            )
        if self.metrics_require_token and not (self.admin_tokens or self.admin_tokens_file):
            raise ValueError("metrics_require_token needs admin tokens (admin_tokens or admin_tokens_file)")
        return self

    def for_workers(self, cpus: int | None = None) -> Settings:
        """These settings with the worker count and each worker's torch threads decided: one
        worker per CPU (one on a GPU) unless set, and the CPUs shared among the workers."""
        if cpus is None:
            from service.workers import available_cpus

            cpus = available_cpus()
        # On a GPU one worker's batcher fills the device's batches; more would split them and
        # each hold a CUDA context.
        on_gpu = self.device == "cuda"
        if self.device == "auto":  # the NVIDIA driver's GPU list: importing torch here would cost the supervisor 200 MB
            gpus = Path("/proc/driver/nvidia/gpus")
            on_gpu = gpus.is_dir() and any(gpus.iterdir())
        workers = self.workers or (1 if on_gpu else cpus)
        threads = self.cpu_threads or max(1, cpus // workers)
        return self.model_copy(update={"workers": workers, "cpu_threads": threads})

    @property
    def max_batch_wait_s(self) -> float:
        return self.max_batch_wait_ms / 1000.0

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    @property
    def refusal_pause_s(self) -> float:
        return self.refusal_pause_ms / 1000.0

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable, for docs and for the deployment files' tests."""
        return {name: f"{ENV_PREFIX}{name.upper()}" for name in cls.model_fields}


# Kubernetes injects <SERVICE>_SERVICE_HOST, <SERVICE>_PORT_8000_TCP... for every Service in the
# namespace (a Service named digit-api gives DIGIT_API_*): not settings, and not misspellings.
_SERVICE_LINK_NAME = re.compile(
    r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_[A-Z]+)?)?)$"
)


def _service_link(name: str, value: str) -> bool:
    if not _SERVICE_LINK_NAME.match(name):
        return False
    if re.search(r"_SERVICE_PORT|_PORT_\d+_", name) or name.endswith("_SERVICE_HOST"):
        return True
    # A bare <SERVICE>_PORT holds a URL (tcp://10.0.0.1:8000); DIGIT_HTTP_PORT=8000 is a misspelt setting.
    return bool(re.match(r"^(tcp|udp|sctp)://", value.strip()))


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """One warning per DIGIT_* variable that is no setting (a typo would otherwise be silently ignored),
    naming the closest real one."""
    known = Settings.env_names().values()
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or _service_link(upper, environ[name]):
            continue
        # Compare what follows the prefix: the shared DIGIT_ would make everything look alike.
        suffixes = [known_name.removeprefix(ENV_PREFIX) for known_name in known]
        close = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.75)
        hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
        warnings.append(f"{name} is not a setting and is ignored{hint}")
    return warnings
