"""Session fixtures for the container tests: the engine, a local torch index, the CPU image built once, and the
measurements reported at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.container import wheel_index
from tests.container.engine import RUN_ID, Engine, build, remove_image, setup
from tests.container.measurements import MEASUREMENTS, image_report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASUREMENTS:
        terminalreporter.section("container tier, measured")
        for what, value in MEASUREMENTS:
            terminalreporter.write_line(f"{what}: {value}")


@pytest.fixture(scope="session")
def engine() -> Engine:
    return setup()


@pytest.fixture(scope="session")
def torch_index(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with wheel_index.serve(engine.wheels, tmp_path_factory.mktemp("wheel-index")) as url:
        yield url


@pytest.fixture(scope="session")
def cpu_image(engine: Engine, torch_index: str) -> Iterator[str]:
    built = build(engine, f"digit-service-test:{RUN_ID}-cpu", torch_index)
    image_report("CPU", built)
    yield built.tag
    remove_image(built.tag)
