"""The goals are computed from the measurements: a met and a missed goal each way, and cells not run."""

from __future__ import annotations

from bench.peers import HANDWRITTEN, SERVICE, TORCHSERVE
from bench.report import INSTANCES, PNG, PNG_DECODE_ONLY, Goal, Results, goals, like_for_like, markdown
from bench.wrk import WrkResult

NO_ERRORS = {"connect": 0, "read": 0, "write": 0, "timeout": 0}


def cell(rps: float, p50: float, p99: float, statuses: dict[int, int] | None = None, **kwargs: object) -> WrkResult:
    statuses = statuses or {200: round(rps * 10)}
    errors = kwargs.pop("socket_errors", NO_ERRORS)
    return WrkResult(
        seconds=10.0,
        requests=sum(statuses.values()),
        statuses=statuses,
        socket_errors=errors,  # type: ignore[arg-type]
        latency_ms={"p50": p50, "p90": p99, "p99": p99, "max": p99, "mean": p50},
        **kwargs,  # type: ignore[arg-type]
    )


def by_name(results: Results) -> dict[str, Goal]:
    return {goal.name.split(",")[0]: goal for goal in goals(results)}


def test_every_goal_met() -> None:
    results = Results(header={}, raw_images_per_s=3000.0)
    results.cells = {
        (TORCHSERVE, PNG, 64): cell(1000, 40, 150),
        (HANDWRITTEN, PNG, 64): cell(500, 100, 160),
        (SERVICE, PNG, 1): cell(400, 2.5, 4),
        (SERVICE, PNG, 64): cell(1600, 30, 100),
        (SERVICE, PNG, 512): cell(0, 20, 120, {200: 14000, 429: 30000}, retry_after_429=30000, peak_rss_kib=500 * 1024),
        (SERVICE, INSTANCES, 1): cell(9, 100, 120),
    }
    marks = {name: goal.met for name, goal in by_name(results).items()}
    assert all(marks.values()), marks
    assert len(marks) == 9
    assert "| ✔ |" in markdown(results) and "✘" not in markdown(results)


def test_missed_goals_are_marked() -> None:
    results = Results(header={}, raw_images_per_s=3000.0)
    results.cells = {
        (TORCHSERVE, PNG, 64): cell(1000, 40, 90),  # faster p99 than ours
        (HANDWRITTEN, PNG, 64): cell(900, 100, 160),
        (SERVICE, PNG, 1): cell(200, 3.5, 6),
        (SERVICE, PNG, 64): cell(1600, 30, 100),
        (SERVICE, PNG, 512): cell(
            0,
            900,
            3900,
            {200: 9000, 429: 10, 503: 3},
            retry_after_429=9,
            socket_errors={**NO_ERRORS, "timeout": 9},
            peak_rss_kib=2000 * 1024,
        ),
        (SERVICE, INSTANCES, 1): cell(5, 200, 220),
    }
    goal = by_name(results)
    assert goal["throughput vs TorchServe"].met is False  # 1.6x, but a higher p99
    assert goal["throughput vs hand-written"].met is False  # 1.8x
    assert goal["single-client p50"].met is False
    assert goal["overload p99 of all answers"].met is False
    assert goal["overload: the excess gets 429 with Retry-After"].met is False  # one 429 without it
    assert goal["overload 2xx/s vs capacity at 64 clients"].met is False  # 900 vs 1600 2xx/s
    assert goal["overload socket errors"].met is False
    assert goal["overload peak RSS (process tree)"].met is False
    assert goal["256-image request vs the raw model at batch 64"].met is False  # 1280 of 3000 images/s


def test_goals_without_measurements_are_not_judged() -> None:
    results = Results(header={}, cells={(SERVICE, PNG, 1): cell(300, 2.0, 3.0)})
    marks = [goal.met for goal in goals(results)]
    assert marks.count(True) == 1 and marks.count(False) == 0
    assert "| – |" in markdown(results)


def test_errors_are_no_throughput() -> None:
    # A peer that refuses most requests fast answers many requests per second, but serves few.
    results = Results(header={})
    results.cells = {
        (TORCHSERVE, PNG, 64): cell(0, 5, 150, {200: 5000, 503: 50000}),
        (SERVICE, PNG, 64): cell(1000, 30, 100),
    }
    goal = by_name(results)["throughput vs TorchServe"]
    assert goal.met is True and goal.measured.startswith("2.00x"), goal


def test_the_same_work_as_torchserves_handler_is_set_against_it() -> None:
    results = Results(header={})
    results.cells = {
        (TORCHSERVE, PNG, 64): cell(4000, 15, 30),
        (SERVICE, PNG, 64): cell(2800, 22, 90),
        (SERVICE, PNG_DECODE_ONLY, 64): cell(3400, 18, 80),
    }
    line = like_for_like(results)
    assert "3,400 vs 4,000 2xx/s (0.85x)" in line and "p99 80.0 vs 30.0 ms" in line
    assert line in markdown(results)
    assert like_for_like(Results(header={}, cells={(SERVICE, PNG, 64): cell(2800, 22, 90)})) == ""
