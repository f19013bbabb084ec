"""How late the event loop runs: the wait that requests sitting in socket buffers see.

When the process is short of CPU, requests wait before any of our code sees them: in the
kernel's socket buffers, then in the event loop's ready queue. The batcher's queue cannot
see that wait, so admission adds this measure of it: a timer that should fire every
`interval_s` fires late by about as long as a newly arrived request waits to be read.
"""

from __future__ import annotations

import asyncio


class LoopLag:
    def __init__(self, interval_s: float = 0.01, slack_s: float = 0.005, smoothing: float = 0.5) -> None:
        self.interval_s = interval_s
        self._slack_s = slack_s  # timers run a little late on any busy loop: that is no backlog
        self._smoothing = smoothing  # weight of the newest sample
        self.seconds = 0.0

    def observe(self, late_s: float) -> None:
        self.seconds += self._smoothing * (max(late_s - self._slack_s, 0.0) - self.seconds)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(loop.time() - due)
