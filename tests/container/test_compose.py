"""`docker compose up` of the repository's own docker-compose.yml, for real: seed, trainer, api in that order,
the api healthy and answering on its published port, a trainer run into a scratch directory, `down -v`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_artifact import find_valid_version, read_metadata
from service.config import Settings
from service.reload import choose_version
from tests.container.client import assert_recognises_digits, model_version
from tests.container.compose import Project, config, project, timestamp, up
from tests.container.engine import REPO, Engine, docker, remove_image, scratch_dir
from tests.container.measurements import report
from tests.deploy.processes import free_port, get
from trainer.data import MNIST_SHA256, fetch_mnist

pytestmark = pytest.mark.container

ONE_SHOT_S = 60.0  # the seed copies one model; the trainer verifies it and exits


@pytest.fixture(scope="module")
def compose_project(
    engine: Engine, torch_index: str, cpu_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Project]:
    """Up once for the module. After `docker build` of the same Dockerfile (cpu_image), so that the build time the
    tier reports is docker build's, and compose's build is the cached one a user's second build would be."""
    scratch = tmp_path_factory.mktemp("compose")
    test_project = project(engine.base_image, torch_index, free_port(), scratch)
    try:
        report("docker compose up --build: api healthy after", f"{up(test_project):.1f} s")
        yield test_project
    finally:
        test_project.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=120, check=False)
        remove_image(test_project.env["IMAGE"])


def test_the_image_is_built_once_for_the_three_services(compose_project: Project) -> None:
    services = config(compose_project)["services"]
    assert [name for name, service in services.items() if "build" in service] == ["api"]
    images = {services[name]["image"] for name in ("model-seed", "trainer", "api")}
    assert images == {compose_project.env["IMAGE"]}


def test_seed_then_trainer_then_api(compose_project: Project) -> None:
    seed, trainer, api = (compose_project.container(name)["State"] for name in ("model-seed", "trainer", "api"))
    assert seed["ExitCode"] == 0 and trainer["ExitCode"] == 0
    assert timestamp(seed["FinishedAt"]) <= timestamp(trainer["StartedAt"])
    assert timestamp(trainer["FinishedAt"]) <= timestamp(api["StartedAt"])
    took_s = (timestamp(trainer["FinishedAt"]) - timestamp(seed["StartedAt"])).total_seconds()
    assert took_s < ONE_SHOT_S, f"seed and trainer took {took_s:.0f} s: the trainer trained instead of verifying"
    assert api["Running"] and api["Health"]["Status"] == "healthy"


def test_the_api_answers_on_the_published_port(compose_project: Project) -> None:
    url = compose_project.published_url()
    status, body = get(f"{url}/readyz")
    assert status == 200, body
    # The seeded default: the newest committed version this machine runs natively (a bfloat16 one needs AMX).
    expected = int(choose_version(Settings(artifact_dir=REPO / "artifacts", device="cpu")).name)
    assert model_version(url) == expected, "the seeded default model"
    assert_recognises_digits(url)


def test_a_trainer_run_writes_a_valid_artifact_into_a_scratch_directory(
    compose_project: Project, tmp_path: Path
) -> None:
    # MNIST from the trainer's own fetcher and cache on the host, handed to the container read-only.
    mnist = scratch_dir(tmp_path, "mnist")
    cache = fetch_mnist()
    for name in MNIST_SHA256:
        shutil.copyfile(cache / name, mnist / name)
        (mnist / name).chmod(0o644)
    out = scratch_dir(tmp_path, "out")
    compose_project.compose(
        "run",
        "--rm",
        "--no-deps",
        "--volume",
        f"{mnist}:/data:ro",
        "--volume",
        f"{out}:/out",
        "trainer",
        "python",
        "-m",
        "trainer",
        "train",
        "--data-dir",
        "/data",
        "--output-dir",
        "/out",
        "--dry-run",
        timeout=600,
    )
    # A smoke run's artifact is complete and verified, and marked so that it never passes for a model.
    assert find_valid_version(out, "mnist-cnn") is None, "a dry run was taken for a model"
    found = find_valid_version(out, "mnist-cnn", allow_smoke=True)
    assert found is not None and found.name == "1", f"no valid artifact in {out}"
    assert read_metadata(found).smoke
    one_off = f"label=com.docker.compose.project={compose_project.name}", "label=com.docker.compose.oneoff=True"
    assert docker("ps", "--all", "--quiet", "--filter", one_off[0], "--filter", one_off[1]).stdout.split() == []


def test_stop_ends_the_api_cleanly_and_down_removes_everything(compose_project: Project) -> None:
    """Runs last in this module: it takes the project down."""
    compose_project.compose("stop", "--timeout", "30", timeout=90)
    api = compose_project.container("api")
    assert api["State"]["ExitCode"] in {0, 143}, f"exit code {api['State']['ExitCode']} (137: killed)"
    assert "Application shutdown complete" in compose_project.compose("logs", "api")
    compose_project.compose("down", "--volumes", "--remove-orphans", timeout=120)
    assert compose_project.resources() == {"containers": [], "volumes": [], "networks": []}


def test_the_gpu_override_builds_the_cuda_image_once_from_the_index_given(engine: Engine, tmp_path: Path) -> None:
    # Resolved by compose itself (no engine work): the override's build arguments merge with the base file's.
    gpu = Project(
        f"digit-test-{tmp_path.name}",
        (REPO / "docker-compose.yml", REPO / "docker-compose.gpu.yml"),
        {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu128"},
    )
    services = config(gpu)["services"]
    assert [name for name, service in services.items() if "build" in service] == ["api"]
    assert services["api"]["build"]["args"]["VARIANT"] == "cuda"
    assert services["api"]["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu128"
    assert {services[name]["image"] for name in ("model-seed", "trainer", "api")} == {"digit-service:cuda"}
