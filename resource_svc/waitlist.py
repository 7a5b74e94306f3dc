"""Every Acquire waiting for a slot: one fair `WaitQueue` per slot kind, and the waiting calls by
request_id, so a retry takes its older call's place instead of queueing twice.

Plain synchronous state, owned by the broker's event loop. A waiter leaves the list exactly once,
through `forget` — when it is granted, fails, or its caller cancels (a done-callback) — and that
is where the waiters gauge goes down.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from resource_svc.leases import AcquireRequest, SlotKind, Superseded
from resource_svc.metrics import BrokerMetrics
from resource_svc.waiters import Waiter, WaitQueue


class WaitList:
    """The waiting Acquires of every kind."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self._metrics = metrics
        self._queues: dict[SlotKind, WaitQueue] = {kind: WaitQueue() for kind in SlotKind}
        self._by_request: dict[str, Waiter] = {}
        self._arrivals = itertools.count(1)

    def queue(self, kind: SlotKind) -> WaitQueue:
        """The waiters for `kind`, in service order (do not change it while iterating)."""
        return self._queues[kind]

    def count(self, kind: SlotKind | None = None) -> int:
        return sum(len(q) for k, q in self._queues.items() if kind is None or k is kind)

    def waiting_with(self, request_id: str) -> Waiter | None:
        """The call waiting with `request_id` ("" never waits under one)."""
        return self._by_request.get(request_id) if request_id else None

    def add(self, request: AcquireRequest, started: float) -> Waiter:
        """Queues a waiter for `request`; one waiting with the same request_id is superseded and
        the new one keeps its turn. `started`: the call's arrival (perf_counter)."""
        loop = asyncio.get_running_loop()
        waiter = Waiter(request=request, seq=next(self._arrivals), future=loop.create_future(), started=started)
        queue = self._queues[request.kind]
        older = self.waiting_with(request.request_id)
        if older is not None and older.queue is queue:
            queue.replace(older, waiter)  # a retry keeps the older call's turn
            older.future.set_exception(Superseded(
                f"a newer Acquire with request_id {request.request_id!r} took this call's place"))
            older.future.exception()  # its caller may be gone: do not warn about it
        else:
            queue.push(waiter)
            self._metrics.waiter_joined(request.kind)
        if request.request_id:
            self._by_request[request.request_id] = waiter
        waiter.future.add_done_callback(lambda _: self.forget(waiter))
        return waiter

    def forget(self, waiter: Waiter) -> None:
        """Takes a waiter off the list (idempotent); runs when its future resolves or is cancelled."""
        if waiter.queue is not None and waiter.queue.remove(waiter):
            self._metrics.waiter_left(waiter.request.kind)
        rid = waiter.request.request_id
        if rid and self._by_request.get(rid) is waiter:
            del self._by_request[rid]

    def fail(self, waiter: Waiter, error: Exception) -> None:
        """Ends a wait with `error` (if it has not ended) and takes the waiter off the list."""
        if not waiter.future.done():
            waiter.future.set_exception(error)
            waiter.future.exception()  # the caller may have gone: do not warn about it
        self.forget(waiter)

    def fail_all(self, error: Callable[[], Exception]) -> None:
        """Ends every wait, each with its own `error()` (one exception object per caller)."""
        for queue in self._queues.values():
            for waiter in list(queue):
                self.fail(waiter, error())
