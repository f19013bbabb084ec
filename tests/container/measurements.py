"""What the container tier measured (image sizes, build and start-up times, the drain), for pytest's summary."""

from __future__ import annotations

from tests.container.engine import Build

MEASUREMENTS: list[tuple[str, str]] = []  # (what, value), in the order measured


def report(what: str, value: str) -> None:
    MEASUREMENTS.append((what, value))


def image_report(name: str, built: Build) -> None:
    report(f"{name} image size", f"{built.size_bytes / 1e6:.0f} MB")
    report(f"{name} image build time", f"{built.seconds:.1f} s")
