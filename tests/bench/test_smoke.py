"""`make bench` in seconds: every server of the comparison (TorchServe included) started, measured for
about a second per cell on a reduced matrix, stopped; the table has numbers for each and the goals a mark.

Needs Debian's wrk and a Java runtime, and the `bench` extra: `scripts/test` installs them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PEERS = ("TorchServe", "hand-written FastAPI", "this service")


def processes_with(text: str) -> list[int]:
    """Live processes whose environment mentions `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.dataset
def test_bench_runs_every_peer_and_prints_numbers_and_goals(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    command = [
        sys.executable,
        "scripts/bench.py",
        "--seconds=1",
        "--warmup=0.5",
        "--concurrency=1,64",
        "--wrk-timeout=2",
        "--no-install",
        f"--out={out}",
    ]
    # Every process the run starts inherits this variable: a mark to find them by afterwards.
    marker = f"BENCH_SMOKE_RUN={uuid.uuid4()}"
    key, value = marker.split("=")
    env = {**os.environ, key: value}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert processes_with(marker) == [], "servers left running"
    table = out.read_text(encoding="utf-8")

    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[field.strip() for field in row] for row in rows if len(row) == 11 and row[0].strip() != "server"]
    measured = {(row[0], row[1], row[2]) for row in cells}
    for peer in PEERS:
        for clients in ("1", "64"):
            assert (peer, "PNG 28x28", clients) in measured, table
    assert ("this service", "JSON pixels 28x28", "64") in measured, table
    assert ("this service", "JSON 256 instances", "1") in measured, table
    for row in cells:
        answers, ok, p50, p99, rss = (float(row[i].replace(",", "")) for i in (3, 4, 5, 6, 10))
        assert answers > 0 and ok > 0 and 0 < p50 <= p99 and rss > 0, row

    goals = [line for line in table.splitlines() if line.endswith(("| ✔ |", "| ✘ |", "| – |"))]
    assert len(goals) == 5, table  # no 512-client cell in the smoke: the overload row reads "not run"
    assert sum(line.endswith(("| ✔ |", "| ✘ |")) for line in goals) == 4, table
