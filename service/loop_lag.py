"""How late the event loop runs: the wait that requests sitting in socket buffers see.

When the process is short of CPU, requests wait before any of our code sees them: in the
kernel's socket buffers, then in the event loop's ready queue. The batcher's queue cannot
see that wait, so admission adds this measure of it: a timer that should fire every
`interval_s` fires late by about as long as a newly arrived request waits to be read.

Like CoDel, it judges by the smallest delay seen lately, not the newest: one late round (a
garbage collection, a neighbour's burst on a shared core, a slow synchronous step) is not
a backlog, and refusing requests for it would turn a blip into errors. Only a loop that is
late round after round, as under a standing overload, counts. The window is rounds, not
time, and the figure is a lower bound of the wait: under load long and short rounds
alternate, and the smallest is reported.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable


class LoopLag:
    def __init__(
        self,
        interval_s: float = 0.01,
        slack_s: float = 0.005,
        window: int = 4,
        report: Callable[[float], None] | None = None,
    ) -> None:
        """`report(seconds)` is called whenever the figure changes (the service sets a gauge)."""
        if window < 1:
            raise ValueError("window must be >= 1")
        self.interval_s = interval_s
        self._slack_s = slack_s  # timers run a little late on any busy loop: that is no backlog
        self._recent = collections.deque([0.0] * window, maxlen=window)  # on time until measured otherwise
        self.seconds = 0.0  # the smallest lateness of the last `window` rounds
        self._report = report

    def observe(self, late_s: float) -> None:
        self._recent.append(max(late_s - self._slack_s, 0.0))
        seconds = min(self._recent)
        if seconds != self.seconds:
            self.seconds = seconds
            if self._report is not None:
                self._report(seconds)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(loop.time() - due)
