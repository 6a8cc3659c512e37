"""Several servers behind one client: which one a call goes to, and when it goes elsewhere.

A client given several targets keeps a channel (or `connections` channels) per target and
routes each call with a `Router`:

- A call goes to the target with the lowest expected wait: its recent answer time (an
  average that fades by half each second it is not refreshed) times its calls in flight
  plus one; ties taken in turn. A slow server (a throttled link) gets few calls, and is
  tried again once its record has faded; targets that failed lately go last.
- Each attempt gets half of the call's remaining deadline while another target is left
  to try, the last one all of it. A call whose server vanished without a word (a
  partition: no RST, the request is simply lost) is re-sent elsewhere after at most half
  its deadline, instead of failing when the deadline passes.
- UNAVAILABLE (after the channel's own retries), an attempt's deadline and
  RESOURCE_EXHAUSTED send the call to the next target; any other error is the answer.
  A target that failed with UNAVAILABLE or a deadline is "suspect" for 1 s, doubling on
  each further failure up to 10 s: calls go to the others meanwhile, then one is tried
  there again. Its first answer clears it.

Predict is idempotent, so sending a call again elsewhere is safe; the caller gets exactly
one answer per call.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .errors import DeadlineExceeded, MnistError, Overloaded, Unavailable

FIRST_COOLDOWN = 1.0  # seconds a target that just failed is passed over
MAX_COOLDOWN = 10.0
HALF_LIFE = 1.0  # seconds after which a target's answer time counts half
WEIGHT = 0.3  # of a new answer time in the average
# Errors after which a call is sent to another target (the request is idempotent).
ELSEWHERE: tuple[type[MnistError], ...] = (Unavailable, DeadlineExceeded, Overloaded)
# Errors after which the target is passed over for a while.
SUSPECT: tuple[type[MnistError], ...] = (Unavailable, DeadlineExceeded)
# A scheme other than a plain host:port list: one target, resolved by gRPC itself.
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def split_targets(target: str | Sequence[str]) -> tuple[str, ...]:
    """`target` as a tuple of targets: "a:1,b:2" is two, "dns:///name:port" (or any other
    scheme gRPC resolves, whose own commas are its addresses) one."""
    if isinstance(target, str):
        if target.startswith(SCHEMES):
            return (target,)
        target = target.split(",")
    targets = tuple(t.strip() for t in target if t.strip())
    if not targets:
        raise ValueError("at least one target is needed")
    return targets


@dataclass(frozen=True)
class Attempt:
    index: int  # of the target
    timeout: float | None  # this attempt's deadline, seconds from now
    last: bool  # no other target is left to try


class Router:
    """Thread-safe bookkeeping of calls in flight and recent failures per target."""

    def __init__(self, targets: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.targets = targets
        self.clock = clock
        self.in_flight = [0] * targets
        self.failures = [0] * targets  # consecutive
        self.suspect_until = [0.0] * targets
        self.latency = [0.0] * targets  # seconds, averaged
        self.measured = [0.0] * targets  # when `latency` was last updated
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def order(self) -> list[int]:
        """Targets in the order to try: not suspect first, then the lowest expected wait,
        ties in turn."""
        now = self.clock()
        turn = next(self._turn)
        with self._lock:
            return sorted(
                range(self.targets),
                key=lambda i: (
                    self.suspect_until[i] > now,
                    self._faded(i, now) * (self.in_flight[i] + 1),
                    (i - turn) % self.targets,
                ),
            )

    def _faded(self, index: int, now: float) -> float:
        return float(self.latency[index] * 0.5 ** ((now - self.measured[index]) / HALF_LIFE))

    def attempts(self, timeout: float | None) -> Iterator[Attempt]:
        """The attempts of one call with deadline `timeout` (None: none): each target at
        most once, while the deadline has time left."""
        deadline = None if timeout is None else self.clock() + timeout
        order = self.order()
        for n, index in enumerate(order):
            last = n == len(order) - 1
            if deadline is None:
                yield Attempt(index, None, last)
                continue
            remaining = deadline - self.clock()
            if n and remaining <= 0:
                return
            yield Attempt(index, remaining if last else remaining / 2, last)

    def started(self, index: int) -> float:
        """Record an attempt's start; returns the time to give `finished`."""
        with self._lock:
            self.in_flight[index] += 1
        return self.clock()

    def abandoned(self, index: int) -> None:
        """An attempt that ended without an answer or an error (cancelled)."""
        with self._lock:
            self.in_flight[index] -= 1

    def finished(self, index: int, started: float, error: MnistError | None) -> bool:
        """Record an attempt's end; True when its call should go to another target."""
        now = self.clock()
        with self._lock:
            self.in_flight[index] -= 1
            faded = self._faded(index, now)
            self.latency[index] = faded + WEIGHT * (now - started - faded)
            self.measured[index] = now
            if error is None:
                self.failures[index] = 0
                self.suspect_until[index] = 0.0
                return False
            if isinstance(error, SUSPECT):
                cooldown = min(FIRST_COOLDOWN * 2 ** self.failures[index], MAX_COOLDOWN)
                self.failures[index] += 1
                self.suspect_until[index] = self.clock() + cooldown
            return isinstance(error, ELSEWHERE)
