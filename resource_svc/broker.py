"""The lease broker: slots per device and kind, leases with deadlines, fencing, fair waiting,
reclaim, durability and GPU leak reports. No gRPC here (`server.py` adapts it).

Concurrency model: all broker state lives on one asyncio event loop and every state change is a
synchronous step (no await between reading and changing state), so there are no locks and no
interleavings inside a change. Durability comes after: each change appends a `LeaseEvent` to the
journal in memory order, and the caller is acknowledged only once the transaction holding it has
committed. If the broker dies before that, the caller never heard of the change and the store
never holds a change that memory did not make.

Time: deadlines are wall-clock seconds (they survive restarts), read from an injected `Clock`.
One task owns expiry (like etcd's lessor): a heap of deadlines — lease expiries and waiters'
wait limits — and a sleep until the earliest, woken early when an earlier deadline is pushed.
Nothing polls.

`LeaseBroker` holds the operations and the state transitions (grant, end, reclaim, hand a freed
slot to the next waiter, restore); the state itself is kept by small synchronous parts it owns:

    slots.SlotTable        which slot is free or held, fencing tokens, where a request may go
    book.LeaseBook         leases by name (active, recent ended), by request_id
    waitlist.WaitList      waiting Acquires: fair queues per kind, by request_id
    expiry.ExpiryQueue     the deadline heap and the task that sleeps on it
    journal.Journal        event seq, group-commit writer, watchers
    metrics.BrokerMetrics  the Prometheus series, counted from events
    leak_checks.LeakChecks NVML processes vs lease holders after a release or reclaim
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mocap_common.logs import get_logger
from resource_svc.book import LeaseBook
from resource_svc.events import Watch
from resource_svc.expiry import Clock, ExpiryQueue, SystemClock
from resource_svc.inventory import Inventory
from resource_svc.journal import Journal
from resource_svc.leak_checks import LeakChecks
from resource_svc.leaks import AncestorLookup, process_ancestors
from resource_svc.leases import (
    AcquireRequest,
    BrokerClosed,
    DeviceKind,
    DeviceSpec,
    DeviceStatus,
    EventType,
    GpuProcess,
    Lease,
    LeaseLost,
    LeaseNotFound,
    LeaseState,
    NoSlot,
    RequestReused,
    SlotKind,
    SlotUsage,
)
from resource_svc.metrics import BrokerMetrics
from resource_svc.slots import SlotPlan, SlotTable
from resource_svc.store import LeaseStore, StoredState
from resource_svc.waiters import Grant, Waiter, WaitQueue
from resource_svc.waitlist import WaitList

__all__ = ["BrokerConfig", "Clock", "LeaseBroker", "SlotPlan", "SystemClock"]

log = get_logger(__name__)

_END_EVENT = {LeaseState.RELEASED: EventType.RELEASED, LeaseState.RECLAIMED: EventType.RECLAIMED}


@dataclass(frozen=True)
class BrokerConfig:
    slots: SlotPlan = field(default_factory=SlotPlan)
    # Ended leases remembered (GetLease, ListLeases, request_id retries); the store keeps as many.
    ended_kept: int = 10_000
    # NVML figures refresh period (GPU inventories only), seconds.
    refresh_interval_s: float = 5.0
    # After a release or reclaim on a GPU, wait this long before asking NVML who still holds memory,
    # so a process that is exiting has time to tear down its CUDA context.
    leak_check_delay_s: float = 2.0
    # Live events buffered per watcher; one that falls further behind re-reads the stored history.
    watch_buffer_events: int = 4096


class LeaseBroker:
    """Grants slots as leases; see the module docstring for the concurrency and time model."""

    def __init__(self, store: LeaseStore, inventory: Inventory, config: BrokerConfig | None = None, *,
                 clock: Clock | None = None,
                 process_lister: Callable[[str], list[GpuProcess]] | None = None,
                 ancestors: AncestorLookup = process_ancestors) -> None:
        self._inventory = inventory
        self._config = config or BrokerConfig()
        self._clock: Clock = clock or SystemClock()
        self._metrics = BrokerMetrics()
        self._journal = Journal(store, on_event=self._metrics.count,
                                watch_buffer_events=self._config.watch_buffer_events)
        specs = inventory.specs()
        self._slots = SlotTable(specs, self._config.slots, inventory.figures)
        self._book = LeaseBook(self._config.ended_kept)
        self._waitlist = WaitList(self._metrics)
        self._expiry: ExpiryQueue[Lease | Waiter] = ExpiryQueue(self._clock)
        self._leaks = LeakChecks(
            specs, delay_s=self._config.leak_check_delay_s, clock=self._clock,
            list_processes=process_lister or inventory.processes, ancestors=ancestors,
            holder_pids=self._book.holder_pids, report=self._journal.record_leak, spawn=self._spawn_check)
        self._tasks: list[asyncio.Task[None]] = []  # every task the broker started; close() ends them
        self._closed = False

    # -- life cycle --------------------------------------------------------------------------

    async def start(self, *, run_expiry: bool = True) -> None:
        """Restores the lease table, then starts the writer, the expiry task and NVML refreshes.

        `run_expiry=False` leaves expiry to explicit `run_due()` calls (tests with a manual clock).
        """
        state = await self._journal.open()
        self._restore(state)
        await asyncio.shield(self._journal.barrier())
        loop = asyncio.get_running_loop()
        if run_expiry:
            self._tasks.append(loop.create_task(self._expiry.run(self.run_due), name="lease-expiry"))
        if any(spec.kind is DeviceKind.GPU for spec in self._slots.specs()):
            self._tasks.append(loop.create_task(self._refresh_loop(), name="nvml-refresh"))

    def stop_accepting(self) -> None:
        """First step of shutdown: waiters fail with BrokerClosed, watchers end, new calls are refused."""
        if self._closed:
            return
        self._closed = True
        self._leaks.stop()
        self._waitlist.fail_all(lambda: BrokerClosed("the broker is shutting down"))
        self._journal.end_watches()

    async def close(self) -> None:
        """Stops the broker: waiters and watchers end, then every queued change is committed
        before the store closes; the inventory closes last, even if the store failed to."""
        self.stop_accepting()
        self._leaks.cancel_pending()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._journal.close()
        finally:
            self._inventory.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the operations ------------------------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> Lease:
        """Grants a slot matching `request`, waiting (priority, then FIFO) until one is free or
        `request.max_wait_s` passes (NoSlot). A cancelled caller leaves the queue at once; a
        grant that reaches a caller who already left goes back to the pool."""
        self._check_open()
        started = time.perf_counter()
        if request.request_id:
            existing = self._lease_for_retry(request)
            if existing is not None:
                await asyncio.shield(self._journal.barrier())
                return existing
        candidates = self._slots.candidates(request.kind, request.selector)
        # A retry of a waiting call takes that call's turn in the queue, not a free slot ahead of
        # the waiters before it.
        retrying = self._waitlist.waiting_with(request.request_id) is not None
        choice = None if retrying else self._slots.pick(request, candidates)
        if choice is not None:
            return await self._acknowledge(self._grant(request, *choice, arrived=started))
        if request.max_wait_s is not None and request.max_wait_s <= 0 and not retrying:
            raise NoSlot(f"no free {request.kind.value} slot on {request.selector.describe()}")
        waiter = self._enqueue(request, started)
        if retrying:  # it took the older call's place; a slot may be free for it by now
            for spec in candidates:
                self._offer(spec.key, request.kind)
        return await self._wait_for_grant(waiter)

    async def renew(self, name: str, token: int, ttl_s: float | None = None) -> Lease:
        """Extends a live lease to now + ttl (the lease's own TTL unless given)."""
        self._check_open()
        lease = self._live(name, token)
        now = self._clock.now()
        lease.expire_time = now + (ttl_s if ttl_s is not None else lease.ttl_s)
        lease.renew_time = now
        self._expiry.push(lease.expire_time, lease)
        snapshot = self._journal.record(EventType.RENEWED, lease, now)
        await asyncio.shield(self._journal.barrier())
        return snapshot

    async def release(self, name: str, token: int) -> tuple[Lease, bool]:
        """Gives a lease back (owner-checked by token). Returns the lease and whether this call
        released it (False: it was already released with this token — an idempotent retry)."""
        self._check_open()
        lease = self._known(name)
        if lease.fencing_token != token:
            raise LeaseLost(f"{name} is not held with fencing token {token}", lease.snapshot())
        if lease.state is LeaseState.RELEASED:
            await asyncio.shield(self._journal.barrier())
            return lease.snapshot(), False
        lease = self._live(name, token)
        snapshot = self._end(lease, LeaseState.RELEASED, self._clock.now())
        await asyncio.shield(self._journal.barrier())
        return snapshot, True

    def validate(self, name: str, token: int) -> tuple[bool, Lease | None]:
        """Whether `name` is held right now with `token` (and the lease, if known)."""
        lease = self._book.find(name)
        if lease is None:
            return False, None
        valid = (lease.state is LeaseState.ACTIVE and lease.fencing_token == token
                 and self._clock.now() < lease.expire_time)
        return valid, lease.snapshot()

    def get(self, name: str) -> Lease:
        lease = self._book.find(name)
        if lease is None:
            raise LeaseNotFound(f"no lease {name}")
        return lease.snapshot()

    def list(self, *, state: LeaseState | None = None, device: str = "", limit: int = 100,
             before_grant_seq: int | None = None) -> list[Lease]:
        """Leases newest first (by grant), optionally only one state or device, before a page mark."""
        return self._book.list(state=state, device=device, limit=limit, before_grant_seq=before_grant_seq)

    def devices(self) -> list[DeviceStatus]:
        """Every device with its latest figures, slot occupancy and waiting callers."""
        specs = sorted(self._slots.specs(), key=lambda s: (s.kind.value, s.index))
        return [self._device_status(spec) for spec in specs]

    def waiting(self, kind: SlotKind | None = None) -> int:
        return self._waitlist.count(kind)

    def watch(self, after_seq: int, live_only: bool = False) -> Watch:
        """Committed events with seq > after_seq (or from now on, `live_only`), then live ones;
        ends with BrokerClosed. Subscribed on return: iterate it, then close() it."""
        self._check_open()
        return self._journal.watch(after_seq, live_only)

    @property
    def last_seq(self) -> int:
        return self._journal.last_seq

    async def check_leaks(self, device_id: str) -> list[GpuProcess]:
        """Asks who holds memory on the device; reports each newly seen process with no live lease
        (event, metric, log line). Returns the leaks found now, reported before or not."""
        return await self._leaks.check(device_id)

    # -- expiry --------------------------------------------------------------------------------

    def run_due(self) -> int:
        """Reclaims every lease and fails every waiter whose deadline has passed; returns how many
        leases were reclaimed. The expiry task calls this; tests with a manual clock call it too."""
        now = self._clock.now()
        reclaimed = 0
        for deadline, item in self._expiry.pop_due(now):
            if isinstance(item, Lease):
                # Renewals push a new entry instead of moving the old one: skip stale entries.
                if item.state is LeaseState.ACTIVE and item.expire_time == deadline:
                    self._reclaim(item, now)
                    reclaimed += 1
            elif not item.future.done() and item.deadline == deadline:
                self._waitlist.fail(item, NoSlot(
                    f"no {item.request.kind.value} slot on {item.request.selector.describe()} became free "
                    f"within {item.request.max_wait_s:g} s"))
        return reclaimed

    def next_deadline(self) -> float | None:
        return self._expiry.next_deadline()

    async def _refresh_loop(self) -> None:
        """NVML figures every refresh interval; waiters that need free memory may now fit."""
        while True:
            await asyncio.sleep(self._config.refresh_interval_s)
            try:
                await asyncio.to_thread(self._inventory.refresh)
            except Exception as exc:  # noqa: BLE001 - keep serving with the last figures
                log.warning("inventory refresh failed", error=str(exc))
                continue
            for key, kind in self._slots.pools():
                self._offer(key, kind)

    def _spawn_check(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Runs a leak check as a broker task (cancelled by close(), forgotten when done)."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # -- waiting (the awaits of acquire) --------------------------------------------------------

    async def _acknowledge(self, lease: Lease) -> Lease:
        """Returns an immediate grant once it is durable; a caller gone before that gives it back."""
        try:
            await asyncio.shield(self._journal.barrier())
        except asyncio.CancelledError:
            self._give_back(lease)
            raise
        return lease

    async def _wait_for_grant(self, waiter: Waiter) -> Lease:
        """The grant a waiter is resolved with, once durable; a caller gone before that leaves
        the queue, and gives back a grant that raced its leaving."""
        try:
            lease, committed = await waiter.future
            await asyncio.shield(committed)
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        return lease

    def _enqueue(self, request: AcquireRequest, started: float) -> Waiter:
        waiter = self._waitlist.add(request, started)
        if request.max_wait_s is not None:
            waiter.deadline = self._clock.now() + request.max_wait_s
            self._expiry.push(waiter.deadline, waiter)
        return waiter

    def _abandon(self, waiter: Waiter) -> None:
        """The caller went away. If the grant raced the cancellation, the slot goes back."""
        self._waitlist.forget(waiter)
        if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            granted, _ = waiter.future.result()
            self._give_back(granted)

    def _give_back(self, granted: Lease) -> None:
        """Releases a grant whose caller left before it could be told (nobody else knows it)."""
        lease = self._book.find(granted.name)
        if lease is not None and lease.state is LeaseState.ACTIVE and lease.fencing_token == granted.fencing_token:
            log.info("caller left before hearing of its grant: releasing it", lease=lease.name)
            self._end(lease, LeaseState.RELEASED, self._clock.now())

    # -- state changes (synchronous: no await inside) -----------------------------------------

    def _grant(self, request: AcquireRequest, spec: DeviceSpec, slot: int, *, arrived: float) -> Lease:
        """Grants `slot` of `spec` to `request` (arrived at perf_counter `arrived`); returns its snapshot."""
        now = self._clock.now()
        token = self._slots.next_token((spec.key, request.kind, slot))
        lease = Lease(
            name=f"leases/{secrets.token_hex(8)}", device=spec.id, device_key=spec.key, device_uuid=spec.uuid,
            device_index=spec.cuda_index, kind=request.kind, slot=slot, fencing_token=token,
            state=LeaseState.ACTIVE, holder=request.holder, ttl_s=request.ttl_s, priority=request.priority,
            grant_time=now, expire_time=now + request.ttl_s, renew_time=now, request_id=request.request_id,
            grant_seq=self._journal.next_seq, fingerprint=request.fingerprint() if request.request_id else "",
        )
        self._occupy(lease)
        self._expiry.push(lease.expire_time, lease)
        snapshot = self._journal.record(EventType.GRANTED, lease, now)
        self._metrics.granted_after(spec.id, request.kind, time.perf_counter() - arrived)
        return snapshot

    def _occupy(self, lease: Lease) -> None:
        self._book.add_active(lease)
        self._slots.take(lease)
        self._metrics.slot_taken(lease)

    def _end(self, lease: Lease, state: LeaseState, now: float, *, occupied: bool = True) -> Lease:
        """Ends a lease (released or reclaimed) and hands its slot to the next waiter.
        `occupied=False`: the lease never held its slot in memory (a restore's stale duplicate)."""
        lease.state = state
        lease.expire_time = now
        self._book.end(lease)
        if occupied and self._slots.vacate(lease):
            self._metrics.slot_freed(lease)
        snapshot = self._journal.record(_END_EVENT[state], lease, now)
        self._leaks.after_release(lease.device_key)
        self._offer(lease.device_key, lease.kind)
        return snapshot

    def _reclaim(self, lease: Lease, now: float) -> None:
        overdue = now - lease.expire_time
        self._metrics.reclaimed_late(overdue)
        h = lease.holder
        log.warning("lease reclaimed: holder stopped renewing", lease=lease.name, device=lease.device,
                    kind=lease.kind.value, slot=lease.slot, fencing_token=lease.fencing_token,
                    holder_service=h.service, holder_job=h.job, holder_pid=h.pid, holder_host=h.host,
                    overdue_ms=round(overdue * 1000, 1))
        self._end(lease, LeaseState.RECLAIMED, now)

    def _offer(self, device_key: str, kind: SlotKind) -> None:
        """Grants free slots of one pool to the first waiters (in service order) that accept it."""
        spec = self._slots.spec(device_key)
        queue = self._waitlist.queue(kind)
        while spec is not None and len(queue):
            slot = self._slots.lowest_free(device_key, kind)
            if slot is None:
                return
            chosen = self._first_fit(queue, spec)
            if chosen is None:
                return
            lease = self._grant(chosen.request, spec, slot, arrived=chosen.started)
            grant: Grant = (lease, self._journal.barrier())
            chosen.future.set_result(grant)
            self._waitlist.forget(chosen)

    def _first_fit(self, queue: WaitQueue, spec: DeviceSpec) -> Waiter | None:
        """The first waiter, in service order, that may be granted on `spec` now."""
        for waiter in queue:
            if waiter.future.done():
                continue  # cancelled: its done-callback removes it
            if self._slots.fits(spec, waiter.request.selector):
                return waiter
        return None

    def _restore(self, state: StoredState) -> None:
        """Rebuilds memory from the stored table: tokens, remembered ended leases, active leases
        (one per slot), then reclaims what expired while the broker was down."""
        self._slots.restore_tokens(state.tokens)
        for lease in state.ended:
            self._book.remember_ended(lease)
        now = self._clock.now()
        winners, losers = _one_per_slot(state.active)
        for lease in state.active:
            self._slots.raise_token(lease.slot_key, lease.fencing_token)
        for lease in winners:
            self._restore_active(lease)
        for lease in losers:
            self._book.add_active(lease)
            self._end(lease, LeaseState.RECLAIMED, now, occupied=False)
        expired = [lease for lease in self._book.active() if lease.expire_time <= now]
        for lease in sorted(expired, key=lambda item: (item.expire_time, item.grant_seq)):
            self._reclaim(lease, now)
        log.info("lease table restored", active=len(self._book.active()),
                 reclaimed=len(expired) + len(losers), last_seq=self._journal.last_seq)

    def _restore_active(self, lease: Lease) -> None:
        spec = self._slots.spec(lease.device_key)
        if spec is not None:
            lease.device = spec.id  # NVML may have renumbered the GPUs since
        else:
            log.warning("restored lease on a device not served any more; it is kept until it ends",
                        lease=lease.name, device=lease.device)
        self._occupy(lease)
        self._expiry.push(lease.expire_time, lease)

    # -- lookups -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosed("the broker is shutting down")

    def _known(self, name: str) -> Lease:
        lease = self._book.find(name)
        if lease is None:
            raise LeaseLost(f"no lease {name}: it never existed or ended long ago")
        return lease

    def _live(self, name: str, token: int) -> Lease:
        """The active lease `name` held with `token`; LeaseLost otherwise. A lease past its
        deadline that the expiry task has not reached yet is reclaimed here first."""
        lease = self._known(name)
        if lease.fencing_token != token:
            raise LeaseLost(f"{name} is not held with fencing token {token}", lease.snapshot())
        self._reclaim_if_due(lease)
        if lease.state is not LeaseState.ACTIVE:
            raise LeaseLost(f"{name} has ended ({lease.state.value})", lease.snapshot())
        return lease

    def _reclaim_if_due(self, lease: Lease) -> None:
        if lease.state is LeaseState.ACTIVE and lease.expire_time <= self._clock.now():
            self._reclaim(lease, self._clock.now())

    def _lease_for_retry(self, request: AcquireRequest) -> Lease | None:
        """The live lease already granted to this request_id; takes over a waiting call with it."""
        fingerprint = request.fingerprint()
        lease = self._book.granted_to(request.request_id)
        if lease is not None:
            if lease.fingerprint != fingerprint:
                raise RequestReused(f"request_id {request.request_id!r} was used for a different Acquire")
            self._reclaim_if_due(lease)
            if lease.state is not LeaseState.ACTIVE:
                raise LeaseLost(f"the lease granted to request_id {request.request_id!r} ({lease.name}) has "
                                f"ended ({lease.state.value}); acquire with a new request_id", lease.snapshot())
            return lease.snapshot()
        waiter = self._waitlist.waiting_with(request.request_id)
        if waiter is not None and waiter.request.fingerprint() != fingerprint:
            raise RequestReused(f"request_id {request.request_id!r} is waiting with a different Acquire")
        return None

    def _device_status(self, spec: DeviceSpec) -> DeviceStatus:
        figures = self._leaks.marked(spec, self._inventory.figures(spec.id))
        return DeviceStatus(spec=spec, figures=figures, slots=tuple(self._slot_usage(spec, kind) for kind in SlotKind))

    def _slot_usage(self, spec: DeviceSpec, kind: SlotKind) -> SlotUsage:
        total, used = self._slots.occupancy(spec.key, kind)
        waiting = sum(1 for w in self._waitlist.queue(kind) if self._slots.selects(spec, w.request.selector))
        return SlotUsage(kind=kind, total=total, used=used, waiting=waiting)


def _one_per_slot(active: list[Lease]) -> tuple[list[Lease], list[Lease]]:
    """Splits restored active rows into one winner per slot and the losers. Two active rows on one
    slot mean the older one was ended in memory but that change never reached the disk (a failed
    commit): the higher token is the later grant and wins."""
    winners: dict[tuple[str, SlotKind, int], Lease] = {}
    losers: list[Lease] = []
    for lease in sorted(active, key=lambda item: item.fencing_token):
        if lease.slot_key in winners:
            losers.append(winners[lease.slot_key])
        winners[lease.slot_key] = lease
    return list(winners.values()), losers
