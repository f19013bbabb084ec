"""wrk, Debian's HTTP load generator: keep-alive connections posting one body, back to back.

A Lua script counts the status codes and the 429s that carry `Retry-After` in each wrk thread and,
when the run is done, prints one JSON line with them, the socket errors and latency percentiles."""

from __future__ import annotations

import functools
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

LUA = r"""
local body_path, content_type = %(body_path)s, %(content_type)s
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(body_path, "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  wrk.headers["Content-Type"] = content_type
  file:close()
  statuses = {}
  retry_after = 0
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 429 then
    for name, _ in pairs(headers) do
      if string.lower(name) == "retry-after" then
        retry_after = retry_after + 1
        break
      end
    end
  end
end

function done(summary, latency, requests)
  local counts, with_retry_after = {}, 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[tostring(status)] = (counts[tostring(status)] or 0) + n
    end
    with_retry_after = with_retry_after + thread:get("retry_after")
  end
  local parts = {}
  for status, n in pairs(counts) do
    table.insert(parts, string.format('"%%s": %%d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us": %%d, "requests": %%d, "statuses": {%%s}, "retry_after_429": %%d, ' ..
    '"errors": {"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}, ' ..
    '"latency_us": {"p50": %%d, "p90": %%d, "p99": %%d, "max": %%d, "mean": %%.1f}}\n',
    summary.duration, summary.requests, table.concat(parts, ", "), with_retry_after,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class WrkResult:
    seconds: float
    requests: int  # completed responses, whatever their status
    statuses: dict[int, int] = field(default_factory=dict)
    retry_after_429: int = 0  # 429s that carried Retry-After
    socket_errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # of all answers, whatever their status
    peak_rss_kib: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else math.nan

    @property
    def ok_rps(self) -> float:
        ok = sum(n for status, n in self.statuses.items() if 200 <= status < 300)
        return ok / self.seconds if self.seconds else math.nan

    def count(self, status: int) -> int:
        return self.statuses.get(status, 0)

    @property
    def other_statuses(self) -> dict[int, int]:
        return {s: n for s, n in sorted(self.statuses.items()) if not 200 <= s < 300 and s != 429}

    @property
    def total_socket_errors(self) -> int:
        return sum(self.socket_errors.values())


def write_script(directory: Path, body_path: Path, content_type: str) -> Path:
    script = directory / f"post-{body_path.stem}.lua"
    script.write_text(
        LUA % {"body_path": _lua_string(str(body_path)), "content_type": _lua_string(content_type)}, encoding="utf-8"
    )
    return script


PRIORITY = -10  # wrk's nice value, where the bench may raise it (root or CAP_SYS_NICE)
_NICE = ["nice", "-n", str(PRIORITY)]


@functools.cache
def priority_raised() -> bool:
    """Whether wrk can run ahead of the servers. On cores it shares with them, a starved load generator
    adds its own scheduling delay to every latency it measures (at 512 clients on 2 cores: p99 770-855 ms
    at the default priority, 318-346 ms raised, with the same server and settings); a client on another
    machine would not. Every peer is measured the same way either way."""
    try:
        probe = subprocess.run([*_NICE, "true"], capture_output=True, text=True, check=False)
    except OSError:
        return False
    return probe.returncode == 0 and not probe.stderr


def run(url: str, script: Path, connections: int, seconds: float, timeout_s: float = 10.0) -> WrkResult:
    """One wrk run: `connections` keep-alive connections for `seconds`, on at most 2 threads (the machine's
    cores; more would only add context switches on the cores the servers use), at a raised priority where
    that is allowed (`priority_raised`)."""
    threads = max(1, min(2, connections))
    command = [
        *(_NICE if priority_raised() else []),
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "-s",
        str(script),
        url,
    ]
    # wrk stops by itself after -d; the margin covers connection set-up and a slow last answer.
    completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds + timeout_s + 30, check=False)
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({completed.returncode}): {completed.stdout[-2000:]} {completed.stderr[-2000:]}"
        )
    data = json.loads(line.removeprefix("WRK_JSON "))
    latency = {key: value / 1000 for key, value in data["latency_us"].items()}
    return WrkResult(
        seconds=data["duration_us"] / 1e6,
        requests=data["requests"],
        statuses={int(status): n for status, n in data["statuses"].items()},
        retry_after_429=data["retry_after_429"],
        socket_errors=data["errors"],
        latency_ms=latency,
    )
