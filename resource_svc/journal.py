"""The broker's journal: every change becomes the next numbered `LeaseEvent`, queued for the store
in memory order (group commit), and handed to watchers once it has committed.

The seq is broker-wide and increases by one per event, so a watcher that resumes after any seq
misses nothing and sees nothing twice. Recording is synchronous (it only appends to the writer's
queue); a caller awaits `barrier()` before it acknowledges its change, i.e. until the change is
durable. `on_event` sees each event as it is recorded — the metrics count events there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from resource_svc.events import EventHub, Watch
from resource_svc.leases import EventType, GpuProcess, Lease, LeaseEvent
from resource_svc.store import GroupCommitWriter, LeaseStore, StoredState


class Journal:
    """Numbers, persists and publishes the broker's events; owns the store from `open()` on."""

    def __init__(self, store: LeaseStore, *, on_event: Callable[[LeaseEvent], None],
                 watch_buffer_events: int) -> None:
        self._store = store
        self._on_event = on_event
        self._hub = EventHub(store.read_events, buffer_limit=watch_buffer_events)
        self._writer = GroupCommitWriter(store, self._hub.publish)
        self._seq = 0
        self._opened = False

    async def open(self) -> StoredState:
        """Reads the stored lease table (off the loop) and starts the writer; the next event
        continues the stored seq."""
        state = await asyncio.to_thread(self._store.load)
        self._writer.start()
        self._opened = True
        self._seq = self._hub.last_published = state.last_seq
        return state

    @property
    def last_seq(self) -> int:
        """The seq of the newest recorded event (committed or not)."""
        return self._seq

    @property
    def next_seq(self) -> int:
        return self._seq + 1

    def record(self, type_: EventType, lease: Lease, now: float) -> Lease:
        """Records a change of `lease` as the next event; returns the snapshot it carries."""
        snapshot = lease.snapshot()
        self._append(LeaseEvent(seq=self._seq + 1, time=now, type=type_, device=lease.device, lease=snapshot))
        return snapshot

    def record_leak(self, device: str, process: GpuProcess, now: float) -> None:
        self._append(LeaseEvent(seq=self._seq + 1, time=now, type=EventType.LEAK_DETECTED, device=device,
                                process=process))

    def barrier(self) -> asyncio.Future[None]:
        """Resolves once every event recorded so far is committed (shared between callers: shield it)."""
        return self._writer.barrier()

    def watch(self, after_seq: int, live_only: bool = False) -> Watch:
        return self._hub.watch(after_seq, live_only)

    def end_watches(self) -> None:
        """Ends every watch (BrokerClosed); recording goes on until `close()`."""
        self._hub.close()

    async def close(self) -> None:
        """Commits what is queued, then closes the store (also when `open()` never ran or failed)."""
        if self._opened:
            await self._writer.close()
        else:
            self._store.close()

    def _append(self, event: LeaseEvent) -> None:
        # The seq is taken even if the writer refuses the event (closed): numbers are never reused.
        self._seq = event.seq
        self._writer.append(event)
        self._on_event(event)
