"""Prometheus metrics on a registry passed in (tests build a fresh one per app).

With several worker processes (`PROMETHEUS_MULTIPROC_DIR` set by the supervisor before they
start), prometheus_client keeps every value in per-process files and /metrics adds them up:
counters and histograms sum, and each gauge says how its workers' values combine.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Latencies here are milliseconds to a few hundred: buckets in seconds from 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)

PREFIX = "digit"


class Metrics:
    """All of the service's metrics; also the batcher's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_http_requests_in_flight", "HTTP requests being handled", multiprocess_mode="livesum", registry=r
        )
        self.queue_wait_seconds = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "time a request's images waited for a batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            f"{PREFIX}_inference_duration_seconds", "forward-pass time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "images per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth_images = Gauge(
            f"{PREFIX}_queue_depth", "images waiting for a batch", multiprocess_mode="livesum", registry=r
        )
        self.event_loop_lag = Gauge(
            f"{PREFIX}_event_loop_lag_seconds",
            "how late the event loop runs now (the most of any worker; the least of its last rounds, so one "
            "stall does not show): how long new requests wait before the service reads them; admission counts it",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.rejections = Counter(
            f"{PREFIX}_rejected_requests", "requests refused before inference, by reason", ["reason"], registry=r
        )
        self.model_errors = Counter(f"{PREFIX}_model_errors", "batches whose forward pass failed", registry=r)
        self.predictions = Counter(f"{PREFIX}_predictions", "predicted digits", ["digit"], registry=r)
        self.confidence = Histogram(
            f"{PREFIX}_prediction_confidence",
            "calibrated probability of the predicted digit",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.reloads = Counter(f"{PREFIX}_model_reloads", "model version switches, by outcome", ["outcome"], registry=r)
        # 1 while any worker serves that version; 0 once none does (set, never removed: a worker
        # cannot take a value out of the shared files).
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "the model being served (value 1)",
            ["name", "version"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self._serving: tuple[str, str] | None = None
        for reason in ("queue_full", "queue_delay", "deadline", "timeout", "unavailable"):
            self.rejections.labels(reason=reason)
        self._per_digit = [self.predictions.labels(digit=str(digit)) for digit in range(10)]
        for outcome in ("reloaded", "refused"):
            self.reloads.labels(outcome=outcome)

    # --- BatchObserver -----------------------------------------------------------------

    def batch_done(self, size: int, inference_s: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(inference_s)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def queue_depth(self, images: int) -> None:
        self.queue_depth_images.set(images)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def model_error(self) -> None:
        self.model_errors.inc()

    # --- the rest ------------------------------------------------------------------------

    def predicted_many(self, digits: list[int], confidences: list[float]) -> None:
        for digit, confidence in zip(digits, confidences, strict=True):
            self._per_digit[digit].inc()
            self.confidence.observe(confidence)

    def reloaded(self, outcome: str) -> None:
        self.reloads.labels(outcome=outcome).inc()

    def serving(self, name: str, version: int) -> None:
        if self._serving is not None:
            self.model_info.labels(*self._serving).set(0)
        self._serving = (name, str(version))
        self.model_info.labels(*self._serving).set(1)

    def exposition(self) -> tuple[bytes, str]:
        """The text for GET /metrics and its content type: every worker's values, combined."""
        if os.environ.get(MULTIPROCESS_ENV):
            combined = CollectorRegistry()
            MultiProcessCollector(combined)
            return generate_latest(combined), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
