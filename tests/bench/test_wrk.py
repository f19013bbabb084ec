"""wrk's priority: raised only where the machine allows it, and said so either way."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from bench import wrk


@pytest.fixture(autouse=True)
def fresh_probe() -> Iterator[None]:
    wrk.priority_raised.cache_clear()
    yield
    wrk.priority_raised.cache_clear()


def _nice_answers(monkeypatch: pytest.MonkeyPatch, returncode: int, stderr: str) -> None:
    def fake_run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        assert command[:3] == ["nice", "-n", str(wrk.PRIORITY)]
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(wrk.subprocess, "run", fake_run)


def test_priority_is_raised_when_nice_may_raise_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _nice_answers(monkeypatch, 0, "")
    assert wrk.priority_raised()


def test_priority_is_left_alone_when_nice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # GNU nice runs the command anyway and only warns: the warning is what tells.
    _nice_answers(monkeypatch, 0, "nice: cannot set niceness: Permission denied\n")
    assert not wrk.priority_raised()
