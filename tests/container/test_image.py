"""`docker build` of the CPU image, for real: what went in, and what did not."""

from __future__ import annotations

import pytest

from model_artifact import list_versions
from tests.container.engine import REPO, docker, inspect

pytestmark = pytest.mark.container


def test_the_cpu_image_runs_as_user_10001_with_the_service_as_its_command(cpu_image: str) -> None:
    config = inspect("image", cpu_image)["Config"]
    assert config["User"] == "10001:10001"
    assert config["Cmd"] == ["python", "-m", "service"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/readyz" in config["Healthcheck"]["Test"][-1]


def test_the_cpu_image_holds_the_cpu_build_of_torch_and_no_build_tools(cpu_image: str) -> None:
    script = (
        "import importlib.util, shutil, torch; "
        "print(torch.version.cuda, importlib.util.find_spec('nvidia') is not None, "
        "[tool for tool in ('gcc', 'cc', 'make') if shutil.which(tool)])"
    )
    result = docker("run", "--rm", "--network", "none", cpu_image, "python", "-c", script)
    assert result.stdout.strip().split(maxsplit=2) == ["None", "False", "[]"], result.stdout


def test_the_cpu_image_carries_the_package_data_and_the_default_model(cpu_image: str) -> None:
    script = (
        "import pathlib, service; root = pathlib.Path(service.__file__).parent; "
        "print((root / 'sanity_digits.npz').is_file(), (root / 'static' / 'index.html').is_file(), "
        "sorted(p.name for p in pathlib.Path('/app/artifacts/mnist-cnn').iterdir()))"
    )
    result = docker("run", "--rm", "--network", "none", cpu_image, "python", "-c", script)
    committed = sorted(str(version) for version in list_versions(REPO / "artifacts", "mnist-cnn"))
    assert result.stdout.strip().split(maxsplit=2) == ["True", "True", str(committed)], result.stdout
