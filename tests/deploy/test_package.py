"""The project as a real wheel (what the image installs), not the editable install of .venv: every data file the
packages need is in the wheel, and the service starts from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.files import ARTIFACTS, REPO
from tests.deploy.processes import free_port, get

PACKAGES = ("model_artifact", "service", "trainer")
START_TIMEOUT_S = 90.0


def _tracked_files(package: str) -> list[str]:
    result = subprocess.run(
        ["git", "ls-files", package], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the tracked sources, so the build leaves nothing in the checkout."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in PACKAGES:
        for name in _tracked_files(package):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("digit_service-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch venv with the wheel installed. The dependencies (torch among them, about 1 GB) are borrowed from
    this test run's environment through a path entry; the editable install's import hook there is not loaded,
    because a .pth file's paths are not site directories (their own .pth files are not processed)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    (site / "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    return venv


def test_the_wheel_holds_every_tracked_file_of_the_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    tracked = {name for package in PACKAGES for name in _tracked_files(package)}
    missing = sorted(tracked - names)
    assert not missing, f"tracked files the wheel leaves out (declare them as package data): {missing}"


@pytest.fixture
def service_from_wheel(wheel_venv: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DIGIT_", "PYTHON"))}
    env.update(DIGIT_HOST="127.0.0.1", DIGIT_PORT=str(port), DIGIT_ARTIFACT_DIR=str(ARTIFACTS))
    log = tmp_path / "service.log"
    # -I and a scratch working directory: nothing is imported from the checkout.
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(wheel_venv / "bin" / "python"), "-I", "-m", "service"],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, port, log
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_the_service_starts_from_the_installed_wheel(
    service_from_wheel: tuple[subprocess.Popen[bytes], int, Path], wheel_venv: Path
) -> None:
    process, port, log = service_from_wheel
    deadline = time.monotonic() + START_TIMEOUT_S
    status = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            status, _ = get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)
        except OSError:
            status = 0
        if status == 200:
            break
        time.sleep(0.2)
    output = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    assert status == 200, f"the service installed from the wheel did not become ready:\n{output}"
    page_status, page = get(f"http://127.0.0.1:{port}/")
    assert page_status == 200 and b"<canvas" in page, "the drawing page is served from the wheel's static files"
    result = subprocess.run(
        [str(wheel_venv / "bin" / "python"), "-I", "-c", "import service; print(service.__file__)"],
        cwd=wheel_venv,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(result.stdout.strip()).is_relative_to(wheel_venv), "service was imported from the wheel"
