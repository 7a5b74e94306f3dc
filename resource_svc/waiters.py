"""Callers waiting for a slot: served by priority (highest first), then by arrival (FIFO).

A waiter is a future the broker resolves exactly once — with a grant, or with an error (its wait
ran out, a retry superseded it, the broker closed). A caller that goes away cancels its future;
the queue drops a cancelled waiter at once (done-callback), and the broker skips any done future
it still meets while granting.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from resource_svc.leases import AcquireRequest, Lease

# What a waiter's future resolves to: the lease snapshot, and the store barrier to await before
# acknowledging it (the grant is durable when that resolves).
Grant = tuple[Lease, "asyncio.Future[None]"]


@dataclass(eq=False)
class Waiter:
    request: AcquireRequest
    seq: int  # arrival order; a retry that supersedes a waiter inherits it
    future: "asyncio.Future[Grant]"
    started: float = 0.0  # perf_counter at arrival, for the wait histogram
    deadline: float | None = None  # clock time its wait runs out
    queue: "WaitQueue | None" = field(default=None, repr=False)

    @property
    def priority(self) -> int:
        return self.request.priority


class WaitQueue:
    """The waiters for one kind of slot, in service order."""

    def __init__(self) -> None:
        self._levels: dict[int, dict[int, Waiter]] = {}  # priority -> seq -> waiter (insertion = FIFO)
        self._priorities: list[int] = []  # ascending; iterated from the end
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Waiter]:
        """Waiters in service order. Do not add or remove while iterating."""
        for priority in reversed(self._priorities):
            yield from self._levels[priority].values()

    def push(self, waiter: Waiter) -> None:
        level = self._levels.get(waiter.priority)
        if level is None:
            level = self._levels[waiter.priority] = {}
            bisect.insort(self._priorities, waiter.priority)
        level[waiter.seq] = waiter
        waiter.queue = self
        self._count += 1

    def remove(self, waiter: Waiter) -> bool:
        """Drops `waiter`; False if it was not queued (already granted, timed out or replaced)."""
        level = self._levels.get(waiter.priority)
        if level is None or level.get(waiter.seq) is not waiter:
            return False
        del level[waiter.seq]
        if not level:
            del self._levels[waiter.priority]
            self._priorities.remove(waiter.priority)
        waiter.queue = None
        self._count -= 1
        return True

    def replace(self, old: Waiter, new: Waiter) -> None:
        """Puts `new` in `old`'s place (same priority, same turn); `old` leaves the queue."""
        assert old.priority == new.priority and self._levels[old.priority][old.seq] is old
        new.seq = old.seq
        self._levels[old.priority][old.seq] = new
        old.queue = None
        new.queue = self
