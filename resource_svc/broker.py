"""The lease broker: slots per device and kind, leases with deadlines, fencing, fair waiting,
reclaim, durability and GPU leak reports. No gRPC here (`server.py` adapts it).

Concurrency model: all broker state lives on one asyncio event loop and every state change is a
synchronous step (no await between reading and changing state), so there are no locks and no
interleavings inside a change. Durability comes after: each change appends a `LeaseEvent` to the
`GroupCommitWriter` in memory order, and the caller is acknowledged only once the transaction
holding it has committed. If the broker dies before that, the caller never heard of the change
and the store never holds a change that memory did not make.

Time: deadlines are wall-clock seconds (they survive restarts), read from an injected `Clock`.
One task owns expiry (like etcd's lessor): a heap of deadlines — lease expiries and waiters'
wait limits — and a sleep until the earliest, woken early when an earlier deadline is pushed.
Nothing polls.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from mocap_common.logs import get_logger
from resource_svc.events import EventHub, Watch
from resource_svc.inventory import Inventory
from resource_svc.leaks import AncestorLookup, find_unleased, mark_unleased, process_ancestors
from resource_svc.leases import (
    AcquireRequest,
    BrokerClosed,
    DeviceFigures,
    DeviceKind,
    DeviceSelector,
    DeviceSpec,
    DeviceStatus,
    EventType,
    GpuProcess,
    Lease,
    LeaseEvent,
    LeaseLost,
    LeaseNotFound,
    LeaseState,
    NoSlot,
    NoSuchDevice,
    RequestReused,
    SlotKind,
    SlotUsage,
    Superseded,
)
from resource_svc.store import GroupCommitWriter, LeaseStore, StoredState
from resource_svc.waiters import Grant, Waiter, WaitQueue

log = get_logger(__name__)

LEASES_ACTIVE = Gauge("mocap_resource_leases_active", "Active leases.", ["device", "kind"])
WAITERS = Gauge("mocap_resource_waiters", "Acquire calls waiting for a slot.", ["kind"])
GRANTS = Counter("mocap_resource_lease_grants_total", "Leases granted.", ["device", "kind"])
RENEWALS = Counter("mocap_resource_lease_renewals_total", "Lease renewals (Renew and KeepAlive).")
RELEASES = Counter("mocap_resource_lease_releases_total", "Leases released by their holder.", ["device", "kind"])
RECLAIMS = Counter("mocap_resource_lease_reclaims_total", "Leases reclaimed after their deadline.",
                   ["device", "kind"])
LEAKS = Counter("mocap_resource_gpu_leaks_total", "Processes found holding GPU memory with no live lease.",
                ["device"])
ACQUIRE_WAIT = Histogram(
    "mocap_resource_acquire_wait_seconds", "Time from an Acquire's arrival to its grant, seconds.", ["kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
)
RECLAIM_DELAY = Histogram(
    "mocap_resource_reclaim_delay_seconds", "How long after its deadline a lease was reclaimed, seconds.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 60),
)


class _PoolMetrics:
    """The metric children of one (device, kind), resolved once: labels() per call costs more."""

    def __init__(self, device: str, kind: SlotKind) -> None:
        self.active = LEASES_ACTIVE.labels(device, kind.value)
        self.grants = GRANTS.labels(device, kind.value)
        self.releases = RELEASES.labels(device, kind.value)
        self.reclaims = RECLAIMS.labels(device, kind.value)
        self.wait = ACQUIRE_WAIT.labels(kind.value)


class Clock(Protocol):
    """Wall-clock time, and a way to sleep until a time or an event."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def wait(self, wake: asyncio.Event, deadline: float | None) -> None:
        """Returns when `wake` is set or `now()` reaches `deadline` (None: only `wake`)."""
        ...


class SystemClock:
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


@dataclass(frozen=True)
class SlotPlan:
    """How many slots of each kind a device has: defaults per device kind, overrides per device
    (by id such as "gpu:1", or by UUID)."""

    gpu: dict[SlotKind, int] = field(default_factory=lambda: {SlotKind.TRAINING: 1, SlotKind.INFERENCE: 3})
    cpu: dict[SlotKind, int] = field(default_factory=lambda: {SlotKind.TRAINING: 1, SlotKind.INFERENCE: 2})
    overrides: dict[str, dict[SlotKind, int]] = field(default_factory=dict)

    def counts(self, spec: DeviceSpec) -> dict[SlotKind, int]:
        counts = dict(self.gpu if spec.kind is DeviceKind.GPU else self.cpu)
        for name in (spec.id, spec.uuid):
            if name and name in self.overrides:
                counts.update(self.overrides[name])
        return counts


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
        self._store = store
        self._inventory = inventory
        self._config = config or BrokerConfig()
        self._clock: Clock = clock or SystemClock()
        self._list_processes = process_lister or inventory.processes
        self._ancestors = ancestors
        self._writer = GroupCommitWriter(store, self._committed)
        self._hub = EventHub(store.read_events, buffer_limit=self._config.watch_buffer_events)

        self._specs: dict[str, DeviceSpec] = {}  # by device key (NVML UUID, or CPU device id)
        self._capacity: dict[tuple[str, SlotKind], int] = {}
        self._free: dict[tuple[str, SlotKind], list[int]] = {}  # heaps of free slot numbers
        for spec in inventory.specs():
            self._specs[spec.key] = spec
            for kind, count in self._config.slots.counts(spec).items():
                self._capacity[(spec.key, kind)] = max(0, count)
                self._free[(spec.key, kind)] = list(range(max(0, count)))
        self._candidates_cache: dict[tuple[SlotKind, DeviceSelector], list[DeviceSpec]] = {}

        self._tokens: dict[tuple[str, SlotKind, int], int] = {}
        self._holders: dict[tuple[str, SlotKind, int], Lease] = {}
        self._active: dict[str, Lease] = {}
        self._ended: OrderedDict[str, Lease] = OrderedDict()
        self._by_request: dict[str, str] = {}  # request_id -> lease name (active and remembered ended)
        self._queues: dict[SlotKind, WaitQueue] = {kind: WaitQueue() for kind in SlotKind}
        self._waiting_by_request: dict[str, Waiter] = {}
        self._arrivals = itertools.count(1)
        self._seq = 0

        self._deadlines: list[tuple[float, int, Lease | Waiter]] = []
        self._deadline_order = itertools.count()
        self._wake = asyncio.Event()
        self._armed_for: float | None = None  # the deadline the expiry task sleeps until

        self._metrics: dict[tuple[str, SlotKind], _PoolMetrics] = {}
        self._leak_checks: dict[str, asyncio.TimerHandle] = {}
        self._reported_leaks: dict[str, set[int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._started = False

    # -- life cycle --------------------------------------------------------------------------

    async def start(self, *, run_expiry: bool = True) -> None:
        """Restores the lease table, then starts the writer, the expiry task and NVML refreshes.

        `run_expiry=False` leaves expiry to explicit `run_due()` calls (tests with a manual clock).
        """
        state = await asyncio.to_thread(self._store.load)
        self._writer.start()
        self._started = True
        self._hub.last_published = state.last_seq
        self._restore(state)
        await asyncio.shield(self._writer.barrier())
        loop = asyncio.get_running_loop()
        if run_expiry:
            self._tasks.append(loop.create_task(self._expiry_loop(), name="lease-expiry"))
        if any(spec.kind is DeviceKind.GPU for spec in self._specs.values()):
            self._tasks.append(loop.create_task(self._refresh_loop(), name="nvml-refresh"))

    def stop_accepting(self) -> None:
        """First step of shutdown: waiters fail with BrokerClosed, watchers end, new calls are refused."""
        if self._closed:
            return
        self._closed = True
        for queue in self._queues.values():
            for waiter in list(queue):
                self._fail_waiter(waiter, BrokerClosed("the broker is shutting down"))
        self._hub.close()

    async def close(self) -> None:
        """Stops the broker: waiters and watchers end, then every queued change is committed
        before the store closes."""
        self.stop_accepting()
        for handle in self._leak_checks.values():
            handle.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._started:
            await self._writer.close()
        else:
            self._store.close()
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
                await asyncio.shield(self._writer.barrier())
                return existing
        candidates = self._candidates(request.kind, request.selector)
        retrying_waiter = request.request_id in self._waiting_by_request
        choice = None if retrying_waiter else self._pick(request, candidates)
        if choice is not None:
            lease = self._grant(request, *choice)
            self._pool_metrics(lease.device, lease.kind).wait.observe(time.perf_counter() - started)
            try:
                await asyncio.shield(self._writer.barrier())
            except asyncio.CancelledError:
                self._give_back(lease)
                raise
            return lease
        if request.max_wait_s is not None and request.max_wait_s <= 0 and not retrying_waiter:
            raise NoSlot(f"no free {request.kind.value} slot on {request.selector.describe()}")
        waiter = self._enqueue(request, started)
        if retrying_waiter:  # it took the older call's place; a slot may be free for it by now
            for spec in candidates:
                self._offer(spec.key, request.kind)
        try:
            lease, committed = await waiter.future
            await asyncio.shield(committed)
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        return lease

    async def renew(self, name: str, token: int, ttl_s: float | None = None) -> Lease:
        """Extends a live lease to now + ttl (the lease's own TTL unless given)."""
        self._check_open()
        lease = self._live(name, token)
        now = self._clock.now()
        lease.expire_time = now + (ttl_s if ttl_s is not None else lease.ttl_s)
        lease.renew_time = now
        self._schedule(lease.expire_time, lease)
        snapshot = self._emit(EventType.RENEWED, lease, now)
        RENEWALS.inc()
        await asyncio.shield(self._writer.barrier())
        return snapshot

    async def release(self, name: str, token: int) -> tuple[Lease, bool]:
        """Gives a lease back (owner-checked by token). Returns the lease and whether this call
        released it (False: it was already released with this token — an idempotent retry)."""
        self._check_open()
        lease = self._known(name)
        if lease.fencing_token != token:
            raise LeaseLost(f"{name} is not held with fencing token {token}", lease.snapshot())
        if lease.state is LeaseState.RELEASED:
            await asyncio.shield(self._writer.barrier())
            return lease.snapshot(), False
        lease = self._live(name, token)
        snapshot = self._end(lease, LeaseState.RELEASED, self._clock.now())
        await asyncio.shield(self._writer.barrier())
        return snapshot, True

    def validate(self, name: str, token: int) -> tuple[bool, Lease | None]:
        """Whether `name` is held right now with `token` (and the lease, if known)."""
        lease = self._active.get(name) or self._ended.get(name)
        if lease is None:
            return False, None
        valid = (lease.state is LeaseState.ACTIVE and lease.fencing_token == token
                 and self._clock.now() < lease.expire_time)
        return valid, lease.snapshot()

    def get(self, name: str) -> Lease:
        lease = self._active.get(name) or self._ended.get(name)
        if lease is None:
            raise LeaseNotFound(f"no lease {name}")
        return lease.snapshot()

    def list(self, *, state: LeaseState | None = None, device: str = "", limit: int = 100,
             before_grant_seq: int | None = None) -> list[Lease]:
        """Leases newest first (by grant), optionally only one state or device, before a page mark."""
        pool: Iterable[Lease]
        if state is LeaseState.ACTIVE:
            pool = self._active.values()
        elif state is not None:
            pool = (lease for lease in self._ended.values() if lease.state is state)
        else:
            pool = itertools.chain(self._active.values(), self._ended.values())
        chosen = [lease for lease in pool
                  if (not device or lease.device == device)
                  and (before_grant_seq is None or lease.grant_seq < before_grant_seq)]
        chosen.sort(key=lambda lease: lease.grant_seq, reverse=True)
        return [lease.snapshot() for lease in chosen[:limit]]

    def devices(self) -> list[DeviceStatus]:
        """Every device with its latest figures, slot occupancy and waiting callers."""
        statuses = []
        for spec in sorted(self._specs.values(), key=lambda s: (s.kind.value, s.index)):
            figures = self._inventory.figures(spec.id)
            if figures.processes:
                holders = self._holder_pids(spec.key)
                figures = DeviceFigures(figures.memory_used_bytes, figures.utilization_percent,
                                        tuple(mark_unleased(figures.processes, holders, self._ancestors)),
                                        figures.refresh_time)
            slots = []
            for kind in SlotKind:
                total = self._capacity.get((spec.key, kind), 0)
                used = sum(1 for slot in range(total) if (spec.key, kind, slot) in self._holders)
                waiting = sum(1 for w in self._queues[kind] if self._selects(spec, w.request.selector))
                slots.append(SlotUsage(kind=kind, total=total, used=used, waiting=waiting))
            statuses.append(DeviceStatus(spec=spec, figures=figures, slots=tuple(slots)))
        return statuses

    def waiting(self, kind: SlotKind | None = None) -> int:
        return sum(len(q) for k, q in self._queues.items() if kind is None or k is kind)

    def watch(self, after_seq: int, live_only: bool = False) -> Watch:
        """Committed events with seq > after_seq (or from now on, `live_only`), then live ones;
        ends with BrokerClosed. Subscribed on return: iterate it, then close() it."""
        self._check_open()
        return self._hub.watch(after_seq, live_only)

    @property
    def last_seq(self) -> int:
        return self._seq

    # -- expiry --------------------------------------------------------------------------------

    def run_due(self) -> int:
        """Reclaims every lease and fails every waiter whose deadline has passed; returns how many
        leases were reclaimed. The expiry task calls this; tests with a manual clock call it too."""
        now = self._clock.now()
        reclaimed = 0
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, item = heapq.heappop(heap)
            if isinstance(item, Lease):
                # Renewals push a new entry instead of moving the old one: skip stale entries.
                if item.state is LeaseState.ACTIVE and item.expire_time == deadline:
                    self._reclaim(item, now)
                    reclaimed += 1
            elif not item.future.done() and item.deadline == deadline:
                self._fail_waiter(item, NoSlot(
                    f"no {item.request.kind.value} slot on {item.request.selector.describe()} became free "
                    f"within {item.request.max_wait_s:g} s"))
        return reclaimed

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    async def _expiry_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                self.run_due()
            except Exception:  # noqa: BLE001 - a bug here must not stop every future reclaim
                log.exception("expiry step failed; retrying")
                await asyncio.sleep(0.1)
                continue
            self._armed_for = self.next_deadline()
            await self._clock.wait(self._wake, self._armed_for)

    def _schedule(self, deadline: float, item: Lease | Waiter) -> None:
        heapq.heappush(self._deadlines, (deadline, next(self._deadline_order), item))
        if self._armed_for is None or deadline < self._armed_for:
            self._armed_for = deadline
            self._wake.set()

    async def _refresh_loop(self) -> None:
        """NVML figures every refresh interval; waiters that need free memory may now fit."""
        while True:
            await asyncio.sleep(self._config.refresh_interval_s)
            try:
                await asyncio.to_thread(self._inventory.refresh)
            except Exception as exc:  # noqa: BLE001 - keep serving with the last figures
                log.warning("inventory refresh failed", error=str(exc))
                continue
            for key, kind in list(self._free):
                self._offer(key, kind)

    # -- state changes (synchronous: no await inside) -----------------------------------------

    def _restore(self, state: StoredState) -> None:
        self._seq = state.last_seq
        self._tokens = dict(state.tokens)
        for lease in state.ended:
            self._remember_ended(lease)
        now = self._clock.now()
        winners: dict[tuple[str, SlotKind, int], Lease] = {}
        losers: list[Lease] = []
        # Two active rows on one slot mean the older one was ended in memory but that change never
        # reached the disk (a failed commit): the higher token is the later grant and wins.
        for lease in sorted(state.active, key=lambda item: item.fencing_token):
            key = lease.slot_key
            self._tokens[key] = max(self._tokens.get(key, 0), lease.fencing_token)
            if key in winners:
                losers.append(winners[key])
            winners[key] = lease
        for lease in winners.values():
            spec = self._specs.get(lease.device_key)
            if spec is not None:
                lease.device = spec.id  # NVML may have renumbered the GPUs since
            else:
                log.warning("restored lease on a device not served any more; it is kept until it ends",
                            lease=lease.name, device=lease.device)
            self._occupy(lease)
            self._schedule(lease.expire_time, lease)
        for lease in losers:
            self._active[lease.name] = lease
            self._end(lease, LeaseState.RECLAIMED, now, occupied=False)
        expired = [lease for lease in self._active.values() if lease.expire_time <= now]
        for lease in sorted(expired, key=lambda item: (item.expire_time, item.grant_seq)):
            self._reclaim(lease, now)
        log.info("lease table restored", active=len(self._active), reclaimed=len(expired) + len(losers),
                 last_seq=self._seq)

    def _lease_for_retry(self, request: AcquireRequest) -> Lease | None:
        """The live lease already granted to this request_id; takes over a waiting call with it."""
        name = self._by_request.get(request.request_id)
        fingerprint = request.fingerprint()
        if name is not None:
            lease = self._active.get(name) or self._ended.get(name)
            if lease is not None:
                if lease.fingerprint != fingerprint:
                    raise RequestReused(f"request_id {request.request_id!r} was used for a different Acquire")
                if lease.state is LeaseState.ACTIVE and lease.expire_time <= self._clock.now():
                    self._reclaim(lease, self._clock.now())
                if lease.state is not LeaseState.ACTIVE:
                    raise LeaseLost(f"the lease granted to request_id {request.request_id!r} ({lease.name}) has "
                                    f"ended ({lease.state.value}); acquire with a new request_id",
                                    lease.snapshot())
                return lease.snapshot()
        waiter = self._waiting_by_request.get(request.request_id)
        if waiter is not None and waiter.request.fingerprint() != fingerprint:
            raise RequestReused(f"request_id {request.request_id!r} is waiting with a different Acquire")
        return None

    def _enqueue(self, request: AcquireRequest, started: float) -> Waiter:
        loop = asyncio.get_running_loop()
        waiter = Waiter(request=request, seq=next(self._arrivals), future=loop.create_future(), started=started)
        queue = self._queues[request.kind]
        older = self._waiting_by_request.get(request.request_id) if request.request_id else None
        if older is not None and older.queue is queue:
            queue.replace(older, waiter)  # a retry keeps the older call's turn
            older.future.set_exception(Superseded(
                f"a newer Acquire with request_id {request.request_id!r} took this call's place"))
            older.future.exception()  # its caller may be gone: do not warn about it
        else:
            queue.push(waiter)
            WAITERS.labels(request.kind.value).inc()
        if request.request_id:
            self._waiting_by_request[request.request_id] = waiter
        if request.max_wait_s is not None:
            waiter.deadline = self._clock.now() + request.max_wait_s
            self._schedule(waiter.deadline, waiter)
        waiter.future.add_done_callback(lambda _: self._forget_waiter(waiter))
        return waiter

    def _forget_waiter(self, waiter: Waiter) -> None:
        """Runs when a waiter's future resolves or is cancelled: it leaves the queue at once."""
        if waiter.queue is not None and waiter.queue.remove(waiter):
            WAITERS.labels(waiter.request.kind.value).dec()
        rid = waiter.request.request_id
        if rid and self._waiting_by_request.get(rid) is waiter:
            del self._waiting_by_request[rid]

    def _fail_waiter(self, waiter: Waiter, error: Exception) -> None:
        if not waiter.future.done():
            waiter.future.set_exception(error)
            waiter.future.exception()  # the caller may have gone: do not warn about it
        self._forget_waiter(waiter)

    def _abandon(self, waiter: Waiter) -> None:
        """The caller went away. If the grant raced the cancellation, the slot goes back."""
        self._forget_waiter(waiter)
        if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            granted, _ = waiter.future.result()
            self._give_back(granted)

    def _give_back(self, granted: Lease) -> None:
        """Releases a grant whose caller left before it could be told (nobody else knows it)."""
        lease = self._active.get(granted.name)
        if lease is not None and lease.fencing_token == granted.fencing_token:
            log.info("caller left before hearing of its grant: releasing it", lease=lease.name)
            self._end(lease, LeaseState.RELEASED, self._clock.now())

    def _grant(self, request: AcquireRequest, spec: DeviceSpec, slot: int) -> Lease:
        now = self._clock.now()
        key = (spec.key, request.kind, slot)
        token = self._tokens.get(key, 0) + 1
        self._tokens[key] = token
        lease = Lease(
            name=f"leases/{secrets.token_hex(8)}", device=spec.id, device_key=spec.key, device_uuid=spec.uuid,
            device_index=spec.cuda_index, kind=request.kind, slot=slot, fencing_token=token,
            state=LeaseState.ACTIVE, holder=request.holder, ttl_s=request.ttl_s, priority=request.priority,
            grant_time=now, expire_time=now + request.ttl_s, renew_time=now, request_id=request.request_id,
            grant_seq=self._seq + 1, fingerprint=request.fingerprint() if request.request_id else "",
        )
        self._occupy(lease)
        self._schedule(lease.expire_time, lease)
        self._pool_metrics(spec.id, request.kind).grants.inc()
        return self._emit(EventType.GRANTED, lease, now)

    def _occupy(self, lease: Lease) -> None:
        key = lease.slot_key
        self._active[lease.name] = lease
        self._holders[key] = lease
        free = self._free.get((lease.device_key, lease.kind))
        if free and free[0] == lease.slot:
            heapq.heappop(free)  # the usual case: grants take the lowest free slot
        elif free is not None and lease.slot in free:
            free.remove(lease.slot)
            heapq.heapify(free)
        if lease.request_id:
            self._by_request[lease.request_id] = lease.name
        self._pool_metrics(lease.device, lease.kind).active.inc()

    def _end(self, lease: Lease, state: LeaseState, now: float, *, occupied: bool = True) -> Lease:
        """Ends a lease (released or reclaimed) and hands its slot to the next waiter."""
        lease.state = state
        lease.expire_time = now
        del self._active[lease.name]
        key = lease.slot_key
        if occupied and self._holders.get(key) is lease:
            del self._holders[key]
            self._pool_metrics(lease.device, lease.kind).active.dec()
            pool = (lease.device_key, lease.kind)
            if pool in self._free and lease.slot < self._capacity[pool]:
                heapq.heappush(self._free[pool], lease.slot)
        self._remember_ended(lease)
        if state is LeaseState.RELEASED:
            self._pool_metrics(lease.device, lease.kind).releases.inc()
            snapshot = self._emit(EventType.RELEASED, lease, now)
        else:
            self._pool_metrics(lease.device, lease.kind).reclaims.inc()
            snapshot = self._emit(EventType.RECLAIMED, lease, now)
        spec = self._specs.get(lease.device_key)
        if spec is not None and spec.kind is DeviceKind.GPU:
            self._schedule_leak_check(spec)
        self._offer(lease.device_key, lease.kind)
        return snapshot

    def _reclaim(self, lease: Lease, now: float) -> None:
        overdue = now - lease.expire_time
        RECLAIM_DELAY.observe(max(0.0, overdue))
        h = lease.holder
        log.warning("lease reclaimed: holder stopped renewing", lease=lease.name, device=lease.device,
                    kind=lease.kind.value, slot=lease.slot, fencing_token=lease.fencing_token,
                    holder_service=h.service, holder_job=h.job, holder_pid=h.pid, holder_host=h.host,
                    overdue_ms=round(overdue * 1000, 1))
        self._end(lease, LeaseState.RECLAIMED, now)

    def _remember_ended(self, lease: Lease) -> None:
        self._ended[lease.name] = lease
        if lease.request_id:
            self._by_request[lease.request_id] = lease.name
        while len(self._ended) > self._config.ended_kept:
            _, old = self._ended.popitem(last=False)
            if old.request_id and self._by_request.get(old.request_id) == old.name:
                del self._by_request[old.request_id]

    def _offer(self, device_key: str, kind: SlotKind) -> None:
        """Grants free slots of one pool to the first waiters (in service order) that accept it."""
        free = self._free.get((device_key, kind))
        spec = self._specs.get(device_key)
        queue = self._queues[kind]
        while free and spec is not None and len(queue):
            chosen = None
            for waiter in queue:
                if waiter.future.done():
                    continue  # cancelled: its done-callback removes it
                if self._selects(spec, waiter.request.selector) and self._has_memory(spec, waiter.request.selector):
                    chosen = waiter
                    break
            if chosen is None:
                return
            lease = self._grant(chosen.request, spec, free[0])
            self._pool_metrics(spec.id, kind).wait.observe(time.perf_counter() - chosen.started)
            grant: Grant = (lease, self._writer.barrier())
            chosen.future.set_result(grant)
            self._forget_waiter(chosen)

    def _emit(self, type_: EventType, lease: Lease, now: float) -> Lease:
        """Records a change of `lease` as the next event; returns the snapshot it carries."""
        self._seq += 1
        snapshot = lease.snapshot()
        self._writer.append(LeaseEvent(seq=self._seq, time=now, type=type_, device=lease.device, lease=snapshot))
        return snapshot

    # -- lookups -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosed("the broker is shutting down")

    def _known(self, name: str) -> Lease:
        lease = self._active.get(name) or self._ended.get(name)
        if lease is None:
            raise LeaseLost(f"no lease {name}: it never existed or ended long ago")
        return lease

    def _live(self, name: str, token: int) -> Lease:
        """The active lease `name` held with `token`; LeaseLost otherwise. A lease past its
        deadline that the expiry task has not reached yet is reclaimed here first."""
        lease = self._known(name)
        if lease.fencing_token != token:
            raise LeaseLost(f"{name} is not held with fencing token {token}", lease.snapshot())
        if lease.state is LeaseState.ACTIVE and lease.expire_time <= self._clock.now():
            self._reclaim(lease, self._clock.now())
        if lease.state is not LeaseState.ACTIVE:
            raise LeaseLost(f"{name} has ended ({lease.state.value})", lease.snapshot())
        return lease

    def _candidates(self, kind: SlotKind, selector: DeviceSelector) -> list[DeviceSpec]:
        cached = self._candidates_cache.get((kind, selector))
        if cached is not None:
            return cached
        found = [spec for spec in self._specs.values()
                 if self._capacity.get((spec.key, kind), 0) > 0 and self._selects(spec, selector)]
        if not found:
            raise NoSuchDevice(f"no device with {kind.value} slots matches {selector.describe()}")
        if selector.min_free_memory_bytes > max(spec.memory_total_bytes for spec in found):
            raise NoSuchDevice(f"no device with {kind.value} slots has {selector.min_free_memory_bytes} bytes "
                               f"of memory in total ({selector.describe()})")
        self._candidates_cache[(kind, selector)] = found
        return found

    @staticmethod
    def _selects(spec: DeviceSpec, selector: DeviceSelector) -> bool:
        if selector.index is not None:
            return spec.index == selector.index
        if selector.uuid is not None:
            return selector.uuid in (spec.uuid, spec.id)
        return True

    def _has_memory(self, spec: DeviceSpec, selector: DeviceSelector) -> bool:
        if not selector.min_free_memory_bytes:
            return True
        figures = self._inventory.figures(spec.id)
        return spec.memory_total_bytes - figures.memory_used_bytes >= selector.min_free_memory_bytes

    def _pick(self, request: AcquireRequest, candidates: list[DeviceSpec]) -> tuple[DeviceSpec, int] | None:
        """A free slot for `request`: the device with the most free memory, then the most free slots."""
        best: tuple[tuple[int, int, int], DeviceSpec] | None = None
        for spec in candidates:
            free = self._free[(spec.key, request.kind)]
            if not free or not self._has_memory(spec, request.selector):
                continue
            free_memory = spec.memory_total_bytes - self._inventory.figures(spec.id).memory_used_bytes
            rank = (-free_memory, -len(free), spec.index)
            if best is None or rank < best[0]:
                best = (rank, spec)
        if best is None:
            return None
        spec = best[1]
        return spec, self._free[(spec.key, request.kind)][0]

    def _pool_metrics(self, device: str, kind: SlotKind) -> _PoolMetrics:
        metrics = self._metrics.get((device, kind))
        if metrics is None:
            metrics = self._metrics[(device, kind)] = _PoolMetrics(device, kind)
        return metrics

    def _holder_pids(self, device_key: str) -> set[int]:
        return {lease.holder.pid for lease in self._active.values()
                if lease.device_key == device_key and lease.holder.pid > 0}

    # -- GPU leak checks -----------------------------------------------------------------------

    def _schedule_leak_check(self, spec: DeviceSpec) -> None:
        if spec.key in self._leak_checks or self._closed:
            return  # one pending check per device covers every release before it runs
        loop = asyncio.get_running_loop()

        def run() -> None:
            del self._leak_checks[spec.key]
            task = loop.create_task(self.check_leaks(spec.id), name=f"leak-check-{spec.id}")
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

        self._leak_checks[spec.key] = loop.call_later(self._config.leak_check_delay_s, run)

    async def check_leaks(self, device_id: str) -> list[GpuProcess]:
        """Asks who holds memory on the device; reports each newly seen process with no live lease
        (event, metric, log line). Returns the leaks found now, reported before or not."""
        spec = next((s for s in self._specs.values() if s.id == device_id), None)
        if spec is None or spec.kind is not DeviceKind.GPU:
            return []
        try:
            processes = await asyncio.to_thread(self._list_processes, device_id)
        except Exception as exc:  # noqa: BLE001 - a failed NVML query must not hurt the broker
            log.warning("leak check failed", device=device_id, error=str(exc))
            return []
        leaks = find_unleased(processes, self._holder_pids(spec.key), self._ancestors)
        reported = self._reported_leaks.setdefault(spec.key, set())
        reported.intersection_update(p.pid for p in leaks)  # forget processes that went away or got leased
        now = self._clock.now()
        for process in leaks:
            if process.pid in reported:
                continue
            reported.add(process.pid)
            LEAKS.labels(device_id).inc()
            log.warning("gpu memory held without a lease", device=device_id, pid=process.pid,
                        used_memory_bytes=process.used_memory_bytes)
            self._seq += 1
            self._writer.append(LeaseEvent(seq=self._seq, time=now, type=EventType.LEAK_DETECTED,
                                           device=device_id, process=process))
        return leaks

    def _committed(self, events: list[LeaseEvent]) -> None:
        self._hub.publish(events)
