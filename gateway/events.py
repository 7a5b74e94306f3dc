"""Job events for watchers: persisted in the store with a per-job `seq`, announced in memory.

The pipeline never waits for a watcher. It writes an event to the store and the store calls
`EventHub.notify(job_id)`, which only sets an `asyncio.Event`. Each watcher then reads what it
has not seen yet from the store at its own pace, so a slow watcher delays no one, and a watcher
that reconnects with `after_seq` (even to a restarted gateway, or another replica) gets every
later event once.

Events written by another gateway replica arrive through the store too: PostgreSQL's
LISTEN/NOTIFY calls `notify` on every replica when the writing transaction commits. A watcher
also reads the store every WATCH_POLL_S whatever it was told, so a notification lost with a
dropped listener connection delays an event by at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator

from gateway.jobs import TERMINAL_STATES
from gateway.store import JobStore
from mocap.v1 import gateway_pb2
from mocap_common.errors import Unavailable

_PAGE = 256
WATCH_POLL_S = 1.0


class EventHub:
    """Wakes the watchers of a job when the store has new events for it."""

    def __init__(self) -> None:
        # One asyncio.Event per watched job; kept only while someone waits on it.
        self._signals: weakref.WeakValueDictionary[str, asyncio.Event] = weakref.WeakValueDictionary()
        self._closed = False

    def signal(self, job_id: str) -> asyncio.Event:
        """The event the next `notify(job_id)` sets. Take it *before* reading the store, so an
        event written between the read and the wait is not missed."""
        signal = self._signals.get(job_id)
        if signal is None:
            signal = asyncio.Event()
            if self._closed:
                signal.set()
            self._signals[job_id] = signal
        return signal

    def notify(self, job_id: str) -> None:
        signal = self._signals.pop(job_id, None)
        if signal is not None:
            signal.set()

    def close(self) -> None:
        """Wakes every watcher for good (gateway shutdown)."""
        self._closed = True
        for signal in list(self._signals.values()):
            signal.set()
        self._signals.clear()

    @property
    def closed(self) -> bool:
        return self._closed


def is_terminal_event(event: gateway_pb2.JobEvent) -> bool:
    return event.type == gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED and event.state in TERMINAL_STATES


async def watch(store: JobStore, hub: EventHub, job_id: str, after_seq: int,
                poll_s: float = WATCH_POLL_S) -> AsyncIterator[gateway_pb2.JobEvent]:
    """Every event of the job after `after_seq`, then live ones, ending after the terminal one."""
    while True:
        signal = hub.signal(job_id)
        events = await store.events_after(job_id, after_seq, _PAGE)
        for event in events:
            yield event
            after_seq = event.seq
            if is_terminal_event(event):
                return
        if events:
            continue
        job = await store.get_job(job_id)
        if job is None:  # deleted
            return
        if job.terminal:
            # It may have ended after the read above: what it wrote since (its terminal event
            # included) is read again before the stream ends; a client that saw the end gets none.
            if await store.events_after(job_id, after_seq, 1):
                continue
            return
        if hub.closed:
            raise Unavailable("the gateway is shutting down; reconnect with after_seq to resume", retry_after_s=1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signal.wait(), poll_s)


class ProgressThrottle:
    """Lets a progress event through at most every `interval_s` per key (e.g. per stage), and only
    when the progress moved by `min_step` since the last one let through: a chatty stage can
    neither flood the store nor fill it during a long, slow stage (≤ 1/min_step events per key)."""

    def __init__(self, interval_s: float = 0.25, min_step: float = 0.005) -> None:
        self._interval_s = interval_s
        self._min_step = min_step
        self._last: dict[object, tuple[float, float]] = {}  # key → (monotonic time, fraction)

    def allow(self, key: object, fraction: float) -> bool:
        now = time.monotonic()
        last_time, last_fraction = self._last.get(key, (float("-inf"), float("-inf")))
        if now - last_time < self._interval_s or abs(fraction - last_fraction) < self._min_step:
            return False
        self._last[key] = (now, fraction)
        return True
