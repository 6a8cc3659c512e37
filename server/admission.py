"""The door every call passes, whatever its API: admitted while the server takes calls,
refused once it stops, and waited for at shutdown.

After SIGTERM the server keeps admitting for the drain delay and until the calls sent before
the signal have arrived (Admission.settle). Once it stops admitting, calls are refused with
ShuttingDown (gRPC UNAVAILABLE, HTTP 503: retryable, counted), and the server waits until
the calls it admitted are done and no new one has arrived for a short while before gRPC
shuts its transport down (see Admission.drain for why).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .errors import ShuttingDown

REFUSED = "the server is shutting down; retry (another replica will answer)"
CUT = "the server stopped before this call finished (grace period over); retry"


class Admission:
    """Which calls the server still takes, and the calls it has taken and not yet answered."""

    def __init__(self) -> None:
        self.open()

    def open(self) -> None:
        self.closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_arrival = time.monotonic()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def enter(self) -> asyncio.Task[Any] | None:
        """Admit the calling task, or raise ShuttingDown once the server stops admitting."""
        self.last_arrival = time.monotonic()
        if self.closed:
            raise ShuttingDown(REFUSED)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            self._idle.clear()
        return task

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()

    def was_cut(self, task: asyncio.Task[Any] | None) -> bool:
        return task is not None and task in self._cut

    async def settle(self, quiet: float, until: float) -> None:
        """Keep admitting until no call has arrived for `quiet` seconds, or until `until`
        (time.monotonic()).

        A call its client sent just before the signal is still on its way: in the socket,
        in gRPC core's queue, or waiting for the event loop (under load, tens of ms). Closing
        the door at once would refuse it; waiting for a pause in arrivals lets it in, and
        costs only `quiet` when no call is coming. The pause is counted in short ticks of
        the event loop, each worth at most its own length however late it fires: a loop or
        process that stalls (a busy machine, a stopped process) cannot make calls that wait
        for it look like silence.
        """
        tick = quiet / 5
        silent = 0.0
        seen = self.last_arrival
        while time.monotonic() < until and silent < quiet:
            slept = time.monotonic()
            await asyncio.sleep(tick)
            if self.last_arrival != seen:
                seen, silent = self.last_arrival, 0.0
            else:
                silent += min(time.monotonic() - slept, tick)

    async def drain(self, grace: float, quiet: float) -> int:
        """Stop admitting; wait for the admitted calls, then for `quiet` seconds without
        arrivals, all within `grace`. Returns how many calls were cut at the end of grace.

        gRPC core resets (CANCELLED) every call that reaches its transport after its shutdown
        begins, and every call it has received but not yet handed to Python. Refusing calls
        here first, until clients have stopped sending, keeps those two sets empty.
        """
        self.closed = True
        give_up = time.monotonic() + grace
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                break
            if self._tasks:
                try:
                    await asyncio.wait_for(self._idle.wait(), remaining)
                except TimeoutError:
                    break
                continue
            silent = time.monotonic() - self.last_arrival
            if silent >= quiet:
                return 0
            await asyncio.sleep(min(quiet - silent, remaining))
        return await self.cut()

    async def cut(self) -> int:
        """Answer every admitted call UNAVAILABLE now (the grace period is over)."""
        tasks = set(self._tasks)
        self._cut |= tasks
        for task in tasks:
            task.cancel()
        if tasks:
            await self._idle.wait()
        return len(tasks)
