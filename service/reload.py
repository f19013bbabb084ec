"""Loading a model version safely, and switching to a new one without downtime.

Every version the service serves, at start-up or on reload, is vetted the same way: its
files are verified against their checksum, its metadata's input spec must be the one the
service feeds, it must be a trained model (not a --dry-run smoke test), a handful of known
digits must be classified correctly, and it is warmed up at every batch size, in the
precision its metadata names. A reload does all of that beside the serving model and only then
swaps it in; a version that fails is refused and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model_artifact import (
    METADATA_FILE,
    MODEL_FILE,
    ArtifactError,
    InputSpec,
    OutputSpec,
    check_servable,
    list_versions,
    load_model,
    read_metadata,
    resolve_version_dir,
    sha256_file,
)
from service.config import Settings
from service.predictor import Predictor, pick_device

log = logging.getLogger(__name__)

SANITY_DIGITS = Path(__file__).parent / "sanity_digits.npz"  # 2 MNIST test digits per class


def _check_specs(predictor: Predictor) -> None:
    meta = predictor.metadata
    if meta.input != InputSpec() or meta.output != OutputSpec() or meta.labels != [str(d) for d in range(10)]:
        raise ArtifactError(
            f"{meta.name} v{meta.version}: metadata input/output spec ({meta.input.shape} {meta.input.dtype} "
            f"{meta.input.polarity} -> {meta.output.shape}) does not match what the service feeds "
            "([N, 1, 28, 28] float32 0..1 white-on-black -> [N, 10] logits)"
        )


def _check_known_digits(predictor: Predictor) -> None:
    with np.load(SANITY_DIGITS) as known:
        images = torch.from_numpy(known["images"].astype(np.float32) / 255.0).unsqueeze(1)
        labels = known["labels"].astype(np.int64)
    logits = predictor.infer(images)
    if logits.shape != (len(labels), 10):
        raise ArtifactError(
            f"model returned shape {tuple(logits.shape)} for {len(labels)} images, expected ({len(labels)}, 10)"
        )
    wrong = int((logits.argmax(dim=1).numpy() != labels).sum())
    if wrong:
        raise ArtifactError(
            f"{predictor.name} v{predictor.version}: sanity check failed: {wrong} of {len(labels)} known digits misclassified"
        )


def prepare_version(version_dir: Path, settings: Settings) -> Predictor:
    """Load, verify, vet and warm one version (blocking; run it on a worker thread)."""
    device = pick_device(settings.device)
    model, metadata = load_model(version_dir, map_location=device)
    check_servable(metadata, allow_smoke=settings.allow_smoke_models)
    predictor = Predictor(model, metadata, device)
    _check_specs(predictor)
    _check_known_digits(predictor)
    predictor.warm_up(settings.max_batch_size)
    return predictor


_PASSED_OVER: set[Path] = set()


def runs_natively(precision: str, device: torch.device) -> bool:
    """Whether `device` computes in `precision` at least as fast as in float32. bfloat16 pays on
    CPUs with AMX (about 3x here) but is several times slower where it is emulated (AVX2, AVX-512)."""
    if precision == "float32":
        return True
    if precision == "bfloat16":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported(including_emulation=False)
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def choose_version(settings: Settings, pinned: int | None = None) -> Path:
    """The version to serve: the pinned one (`pinned`, else the settings'), or else the newest whose
    precision this device runs natively. A newer version in a precision the hardware only emulates
    is passed over with a log line, never served in other numerics: the older version that is
    served says so in every answer (`X-Model-Version`) and in GET /v1/model (`precision`)."""
    pinned = pinned if pinned is not None else settings.model_version
    if pinned is not None:
        return resolve_version_dir(settings.artifact_dir, settings.model_name, pinned)
    device = pick_device(settings.device)
    newest = resolve_version_dir(settings.artifact_dir, settings.model_name)
    for version in reversed(list_versions(settings.artifact_dir, settings.model_name)):
        version_dir = newest.parent / str(version)
        try:
            precision = read_metadata(version_dir).precision
        except ArtifactError:
            return version_dir  # vetting refuses it, says why, and remembers it
        if runs_natively(precision, device):
            return version_dir
        if version_dir not in _PASSED_OVER:  # once: the watcher asks again every interval
            _PASSED_OVER.add(version_dir)
            log.info("passing over %s: %s is emulated on %s, slower than float32", version_dir, precision, device)
    return newest  # nothing runs natively: the newest, as asked


def prepare_configured(settings: Settings, pinned: int | None = None) -> Predictor:
    """The version to serve (see `choose_version`), ready to serve."""
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    version_dir = choose_version(settings, pinned)
    predictor = prepare_version(version_dir, settings)
    log.info("loaded %s v%s from %s onto %s", predictor.name, predictor.version, version_dir, predictor.device)
    return predictor


@dataclass(frozen=True)
class ReloadOutcome:
    status: str  # "reloaded" or "unchanged"
    previous_version: int
    serving_version: int


class ReloadRefused(ArtifactError):
    """A newer version exists but failed vetting; the old one keeps serving."""


def fingerprint(version_dir: Path) -> str:
    """What a version's vetting depends on: its metadata and model file, by checksum. A refusal is
    remembered under this, so asking again is cheap, and a version whose files change is vetted anew."""
    digest = hashlib.sha256()
    for name in (METADATA_FILE, MODEL_FILE):
        try:
            digest.update(sha256_file(version_dir / name).encode())
        except OSError:  # missing or vanishing: vetting will say what is wrong
            digest.update(b"missing")
    return digest.hexdigest()


class Reloader:
    """Switches the registry to the newest (or pinned) version. `install` puts a vetted model in
    service; `prepare` loads and vets one version (blocking; run on a worker thread)."""

    def __init__(
        self,
        settings: Settings,
        current: Callable[[], Predictor | None],
        install: Callable[[Predictor], None],
        *,
        prepare: Callable[[Path], Predictor] | None = None,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._current = current
        self._install = install
        self._prepare = prepare or (lambda version_dir: prepare_version(version_dir, settings))
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._lock = asyncio.Lock()
        self._refused: dict[str, str] = {}  # fingerprint -> why

    async def reload(self) -> ReloadOutcome:
        """Switch to the newest version (or the pinned one) if it differs from the serving one."""
        async with self._lock:
            settings = self._settings
            current = self._current()
            if current is None:
                raise ArtifactError("no model is being served yet")
            version_dir = choose_version(settings)
            version = int(version_dir.name)
            if version == current.version:
                return ReloadOutcome("unchanged", current.version, current.version)
            key = await asyncio.to_thread(fingerprint, version_dir)
            if key in self._refused:
                raise ReloadRefused(self._refused[key])
            try:
                candidate = await asyncio.to_thread(self._prepare, version_dir)
            except Exception as exc:  # noqa: BLE001 - any failure refuses the candidate
                reason = f"version {version} refused: {exc}; still serving version {current.version}"
                if isinstance(exc, ArtifactError) or not isinstance(exc, MemoryError | OSError):
                    # The version itself is wrong (checksum, spec, known digits, a model that fails):
                    # remember it. Running out of memory or an I/O error may pass: look again next time.
                    self._refused[key] = reason
                self._on_outcome("refused")
                log.error("%s", reason)
                raise ReloadRefused(reason) from None
            self._install(candidate)
            self._on_outcome("reloaded")
            log.info("reloaded: now serving %s v%s (was v%s)", candidate.name, candidate.version, current.version)
            return ReloadOutcome("reloaded", current.version, candidate.version)

    async def watch(self, interval_s: float, paused: Callable[[], bool] = lambda: False) -> None:
        """Poll the artifact directory and reload when a newer version appears (or a refused one changes)."""
        settings = self._settings
        while True:
            await asyncio.sleep(interval_s)
            current = self._current()
            if current is None or paused():
                continue
            try:
                newest = (list_versions(settings.artifact_dir, settings.model_name) or [0])[-1]
                if newest > current.version:
                    await self.reload()  # which may pass over versions this device only emulates
            except ArtifactError:
                pass  # a refusal was logged once; the old model keeps serving
            except Exception:
                log.exception("looking for a new model version failed; will look again")
