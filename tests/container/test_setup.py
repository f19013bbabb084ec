"""The container tier fails, and says why, when the machine cannot run an engine: it never skips."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.container import engine


def test_a_setup_that_cannot_start_the_engine_fails_the_tier_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "container-setup"
    broken.write_text("#!/bin/sh\necho 'container-setup: the Docker engine did not start within 30 s' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(engine, "SETUP", broken)
    with pytest.raises(BaseException) as raised:  # a skip is a BaseException too, and must not be what comes
        engine.setup()
    assert raised.type is pytest.fail.Exception, f"{raised.type.__name__}: the tier must fail, never skip"
    assert "the Docker engine did not start within 30 s" in str(raised.value)
