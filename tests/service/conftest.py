from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.config import Settings
from service.predictor import Predictor
from tests.helpers import make_metadata, scripted_mean_net


def build_client(settings: Settings | None = None, model=None, temperature: float = 1.0) -> TestClient:
    settings = settings or Settings(max_batch_wait_ms=1, max_batch_size=8)
    predictor = Predictor(model if model is not None else scripted_mean_net(), make_metadata(temperature=temperature))
    return TestClient(create_app(settings, predictor=predictor, metrics_registry=CollectorRegistry()))


@pytest.fixture
def client() -> Iterator[TestClient]:
    with build_client() as test_client:
        yield test_client
