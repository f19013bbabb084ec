import pytest
from pydantic import ValidationError

from service.config import Settings, unknown_settings


def test_settings_come_from_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIGIT_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("DIGIT_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("DIGIT_LOG_FORMAT", "JSON")
    monkeypatch.setenv("DIGIT_MODEL_VERSION", "3")
    settings = Settings()
    assert settings.max_batch_size == 32
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.log_format == "json"
    assert settings.model_version == 3


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("DIGIT_MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("DIGIT_DEVICE", "tpu", "device"),
        ("DIGIT_PORT", "99999", "port"),
        ("DIGIT_QUEUE_LIMIT", "10", "queue_limit"),
        ("DIGIT_REQUEST_TIMEOUT_S", "-1", "request_timeout_s"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=fragment):
        Settings()


def test_env_names_cover_every_setting() -> None:
    names = Settings.env_names()
    assert names["max_batch_wait_ms"] == "DIGIT_MAX_BATCH_WAIT_MS"
    assert set(names) == set(Settings.model_fields)


def test_misspelled_settings_are_named_with_the_closest_real_one() -> None:
    environ = {
        "DIGIT_MAX_BATCH_SIZ": "32",  # a typo: silently ignored without this warning
        "DIGIT_PORT": "8000",  # a real setting
        "DIGIT_API_SERVICE_HOST": "10.0.0.1",  # Kubernetes service links for a Service named digit-api
        "DIGIT_API_PORT_8000_TCP": "tcp://10.0.0.1:8000",
        "DIGIT_API_PORT": "tcp://10.0.0.1:8000",
        "DIGIT_API_SERVICE_PORT": "8000",
        "DIGIT_FROBNICATE": "1",
        "DIGIT_HTTP_PORT": "8000",  # ends like a service link, but holds a bare port: a misspelt setting
        "PATH": "/usr/bin",
    }
    assert unknown_settings(environ) == [
        "DIGIT_FROBNICATE is not a setting and is ignored",
        "DIGIT_HTTP_PORT is not a setting and is ignored",
        "DIGIT_MAX_BATCH_SIZ is not a setting and is ignored; did you mean DIGIT_MAX_BATCH_SIZE?",
    ]
