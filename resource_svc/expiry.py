"""Time for the broker: the clock it reads, and the queue of deadlines that drives expiry.

`ExpiryQueue` is etcd's LeaseQueue and the part of its run loop that waits on it: a heap of
(deadline, item) and one task that sleeps until the earliest deadline, woken early when an earlier
one is pushed. What an item's passing deadline means (reclaim a lease, fail a waiter) is the
broker's call; this module only says *when*. Nothing polls.

Entries are never moved or removed: a renewal pushes a new deadline and leaves the old entry to
be skipped when it comes due (the broker checks each popped deadline against the item's current
one). That keeps every push O(log n) and needs no index into the heap.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from mocap_common.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

# After a failed expiry step, wait this long before the next try, so a bug that fails every step
# costs a log line per 100 ms instead of a busy loop.
RETRY_AFTER_FAILURE_S = 0.1


class Clock(Protocol):
    """Wall-clock time, and a way to sleep until a time or an event."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def wait(self, wake: asyncio.Event, deadline: float | None) -> None:
        """Returns when `wake` is set or `now()` reaches `deadline` (None: only `wake`)."""
        ...


class SystemClock:
    """`time.time()`, and a timer on the running loop for `wait`."""

    def now(self) -> float:
        return time.time()

    async def wait(self, wake: asyncio.Event, deadline: float | None) -> None:
        timer = None
        if deadline is not None:
            delay = deadline - time.time()
            if delay <= 0:
                return
            timer = asyncio.get_running_loop().call_later(delay, wake.set)
        try:
            await wake.wait()
        finally:
            if timer is not None:
                timer.cancel()


class ExpiryQueue(Generic[T]):
    """Deadlines of items, earliest first, and the loop that wakes when the earliest passes."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, T]] = []
        # Ties on the deadline are broken by push order, so items themselves are never compared.
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._armed_for: float | None = None  # the deadline the loop sleeps until

    def push(self, deadline: float, item: T) -> None:
        """Adds a deadline; wakes the loop if it sleeps until a later one."""
        heapq.heappush(self._heap, (deadline, next(self._order), item))
        if self._armed_for is None or deadline < self._armed_for:
            self._armed_for = deadline
            self._wake.set()

    def pop_due(self, now: float) -> Iterator[tuple[float, T]]:
        """Pops (deadline, item) for every deadline <= now, earliest first. The heap is looked at
        again after each item is handled, so a deadline pushed meanwhile that is due comes too."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, item = heapq.heappop(heap)
            yield deadline, item

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    async def run(self, expire_due: Callable[[], object]) -> None:
        """Calls `expire_due()` whenever the earliest deadline has passed (or an earlier one was
        pushed), forever; cancel the task to stop it."""
        while True:
            # Cleared before the step: a push during the step sets it again and is not lost.
            self._wake.clear()
            try:
                expire_due()
            except Exception:  # noqa: BLE001 - a bug here must not stop every future reclaim
                log.exception("expiry step failed; retrying")
                await asyncio.sleep(RETRY_AFTER_FAILURE_S)
                continue
            self._armed_for = self.next_deadline()
            await self._clock.wait(self._wake, self._armed_for)
