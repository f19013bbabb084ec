"""The benchmark's Markdown: one row per measured cell, then ratios and goals computed from those rows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.peers import HANDWRITTEN, SERVICE, TORCHSERVE
from bench.wrk import WrkResult

PNG, JSON_PIXELS, INSTANCES = "PNG 28x28", "JSON pixels 28x28", "JSON 256 instances"
# The PNG posted with ?preprocess=false: decoded only, the work TorchServe's handler does (no MNIST centring).
PNG_DECODE_ONLY = "PNG 28x28, preprocess=false"
CAPACITY_CLIENTS, OVERLOAD_CLIENTS = 64, 512
RSS_LIMIT_MIB = 1.5e9 / 2**20  # the goal's 1.5 GB, in MiB


@dataclass
class Results:
    header: dict[str, str]  # what was measured, on what: printed above the tables
    cells: dict[tuple[str, str, int], WrkResult] = field(default_factory=dict)  # (peer, payload, clients)
    idle_rss_kib: dict[str, int] = field(default_factory=dict)  # each server's tree, ready and warmed up
    raw_images_per_s: float | None = None  # the raw model at batch 64, in the benchmark's process

    def get(self, peer: str, payload: str, clients: int) -> WrkResult | None:
        return self.cells.get((peer, payload, clients))


def _num(value: float, digits: int = 0) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _mib(kib: int | None) -> str:
    return _num(kib / 1024) if kib else "–"


def cell_table(results: Results) -> list[str]:
    lines = [
        "| server | payload | clients | answers/s | 2xx/s | p50 ms | p99 ms | 429 (with Retry-After) "
        "| other non-2xx | socket errors c/r/w/t | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (peer, payload, clients), r in results.cells.items():
        others = ", ".join(f"{status}: {n:,}" for status, n in r.other_statuses.items()) or "0"
        errors = "/".join(str(r.socket_errors.get(k, 0)) for k in ("connect", "read", "write", "timeout"))
        lines.append(
            f"| {peer} | {payload} | {clients} | {_num(r.rps)} | {_num(r.ok_rps)} | {_num(r.latency_ms['p50'], 2)} "
            f"| {_num(r.latency_ms['p99'], 1)} | {r.count(429):,} ({r.retry_after_429:,}) | {others} | {errors} "
            f"| {_mib(r.peak_rss_kib)} |"
        )
    return lines


def ratio_table(results: Results) -> list[str]:
    """This service against each peer at every client count both ran (PNG). Successful answers only: under
    overload a fast error is no throughput."""
    lines = [
        "| clients | this service / TorchServe, 2xx/s | this service / hand-written, 2xx/s "
        "| p99 ms: this service / TorchServe / hand-written |",
        "|---|---|---|---|",
    ]
    levels = sorted({clients for peer, payload, clients in results.cells if peer == SERVICE and payload == PNG})
    for clients in levels:
        ours = results.get(SERVICE, PNG, clients)
        others = [results.get(peer, PNG, clients) for peer in (TORCHSERVE, HANDWRITTEN)]
        if ours is None or not any(others):
            continue
        ratios = [f"{ours.ok_rps / other.ok_rps:.2f}x" if other and other.ok_rps else "–" for other in others]
        p99 = " / ".join(_num(r.latency_ms["p99"], 1) if r else "–" for r in (ours, *others))
        lines.append(f"| {clients} | {ratios[0]} | {ratios[1]} | {p99} |")
    return lines if len(lines) > 2 else []


@dataclass
class Goal:
    name: str
    measured: str
    target: str
    met: bool | None  # None: not measured in this run

    def row(self) -> str:
        mark = "–" if self.met is None else ("✔" if self.met else "✘")
        return f"| {self.name} | {self.measured} | {self.target} | {mark} |"


def goals(results: Results) -> list[Goal]:
    ours = results.get(SERVICE, PNG, CAPACITY_CLIENTS)
    ts = results.get(TORCHSERVE, PNG, CAPACITY_CLIENTS)
    hand = results.get(HANDWRITTEN, PNG, CAPACITY_CLIENTS)
    single = results.get(SERVICE, PNG, 1)
    over = results.get(SERVICE, PNG, OVERLOAD_CLIENTS)
    big = results.get(SERVICE, INSTANCES, 1)
    out: list[Goal] = []

    if ours and ts:
        ratio, p99_ours, p99_ts = _ratio(ours.ok_rps, ts.ok_rps), ours.latency_ms["p99"], ts.latency_ms["p99"]
        out.append(
            Goal(
                f"throughput vs TorchServe, PNG, {CAPACITY_CLIENTS} clients",
                f"{ratio:.2f}x ({_num(ours.ok_rps)} vs {_num(ts.ok_rps)} 2xx/s); p99 {p99_ours:.1f} vs {p99_ts:.1f} ms",
                "≥ 1.5x, lower p99",
                ratio >= 1.5 and p99_ours < p99_ts,
            )
        )
    else:
        out.append(Goal("throughput vs TorchServe", "not run", "≥ 1.5x, lower p99", None))
    if ours and hand:
        ratio = _ratio(ours.ok_rps, hand.ok_rps)
        out.append(
            Goal(
                f"throughput vs hand-written, PNG, {CAPACITY_CLIENTS} clients",
                f"{ratio:.2f}x ({_num(ours.ok_rps)} vs {_num(hand.ok_rps)} 2xx/s)",
                "≥ 2x",
                ratio >= 2,
            )
        )
    else:
        out.append(Goal("throughput vs hand-written", "not run", "≥ 2x", None))
    if single:
        p50 = single.latency_ms["p50"]
        out.append(Goal("single-client p50, PNG", f"{p50:.2f} ms", "< 3 ms", p50 < 3))
    else:
        out.append(Goal("single-client p50, PNG", "not run", "< 3 ms", None))

    if over:
        p99 = over.latency_ms["p99"]
        out.append(
            Goal(f"overload p99 of all answers, {OVERLOAD_CLIENTS} clients", f"{p99:.1f} ms", "< 150 ms", p99 < 150)
        )
        n429, with_header = over.count(429), over.retry_after_429
        out.append(
            Goal(
                "overload: the excess gets 429 with Retry-After",
                f"{n429:,} 429s, {with_header:,} with Retry-After; other non-2xx: {sum(over.other_statuses.values()):,}",
                "429s, all with Retry-After",
                n429 > 0 and with_header == n429,
            )
        )
        if ours:
            ratio = _ratio(over.ok_rps, ours.ok_rps)
            out.append(
                Goal(
                    f"overload 2xx/s vs capacity at {CAPACITY_CLIENTS} clients",
                    f"{ratio:.2f}x ({_num(over.ok_rps)} vs {_num(ours.ok_rps)} 2xx/s)",
                    "≥ 0.8x",
                    ratio >= 0.8,
                )
            )
        errors = over.total_socket_errors
        out.append(Goal("overload socket errors", f"{errors:,}", "0", errors == 0))
        rss = over.peak_rss_kib / 1024
        out.append(
            Goal(
                "overload peak RSS (process tree)",
                f"{rss:,.0f} MiB",
                f"< {RSS_LIMIT_MIB:,.0f} MiB",
                rss < RSS_LIMIT_MIB,
            )
        )
    else:
        out.append(Goal(f"overload at {OVERLOAD_CLIENTS} clients", "not run", "see the goals", None))

    if big and results.raw_images_per_s:
        rate = 256 * big.ok_rps
        share = rate / results.raw_images_per_s
        out.append(
            Goal(
                "256-image request vs the raw model at batch 64",
                f"{share:.0%} ({_num(rate)} vs {_num(results.raw_images_per_s)} images/s)",
                "≥ 70 %",
                share >= 0.7,
            )
        )
    else:
        out.append(Goal("256-image request vs the raw model", "not run", "≥ 70 %", None))
    return out


def markdown(results: Results) -> str:
    lines = ["## Benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in results.header.items()]
    lines += ["", *cell_table(results), ""]
    if results.idle_rss_kib:
        idle = ", ".join(f"{peer} {_mib(kib)} MiB" for peer, kib in results.idle_rss_kib.items())
        lines.append(f"Memory when ready and warmed up (RSS summed over each server's process tree): {idle}.")
    if results.raw_images_per_s:
        lines.append(f"Raw model, batch 64, in the benchmark's process: {_num(results.raw_images_per_s)} images/s.")
    if ratios := ratio_table(results):
        lines += ["", *ratios]
    if same_work := like_for_like(results):
        lines += ["", same_work]
    lines += ["", "| goal | measured | target | met |", "|---|---|---|---|", *(g.row() for g in goals(results))]
    return "\n".join(lines) + "\n"


def like_for_like(results: Results) -> str:
    """This service doing only what TorchServe's handler does (decode the PNG), against TorchServe."""
    ours = results.get(SERVICE, PNG_DECODE_ONLY, CAPACITY_CLIENTS)
    ts = results.get(TORCHSERVE, PNG, CAPACITY_CLIENTS)
    if not ours or not ts:
        return ""
    return (
        f"The same work as TorchServe's handler (`?preprocess=false`: the PNG decoded, not made MNIST-like), "
        f"{CAPACITY_CLIENTS} clients: {_num(ours.ok_rps)} vs {_num(ts.ok_rps)} 2xx/s "
        f"({_ratio(ours.ok_rps, ts.ok_rps):.2f}x); p99 {ours.latency_ms['p99']:.1f} vs {ts.latency_ms['p99']:.1f} ms."
    )


def _ratio(ours: float, other: float) -> float:
    """ours / other; a peer that answered nothing counts as infinitely slower (and the row shows its 0)."""
    return ours / other if other else float("inf")
