"""The broker's Prometheus series (`mocap_resource_*`) and the one object that updates them.

Counters follow the events the broker records (`count(event)` sees every granted, renewed,
released, reclaimed and leak event as it is recorded), so grant logic never touches a counter.
Gauges and histograms describe state or timings no event carries, and are fed by the component
that owns that state: slot occupancy (`slot_taken`/`slot_freed`), the wait queue
(`waiter_joined`/`waiter_left`), grant latency and reclaim lateness.

Series children are resolved once per label set, on first use (a label set appears in /metrics
only once something happened to it): `labels()` on every call costs more than the update itself
on the lease hot path.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from resource_svc.leases import EventType, Lease, LeaseEvent, SlotKind

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

# The per-(device, kind) counter each lease event moves.
_POOL_COUNTERS: dict[EventType, Counter] = {
    EventType.GRANTED: GRANTS,
    EventType.RELEASED: RELEASES,
    EventType.RECLAIMED: RECLAIMS,
}


class _PoolSeries:
    """The children of one (device, kind): the occupancy gauge, one counter per lease event, and
    the grant latency of the kind (resolved with the pool, as the series always appeared)."""

    def __init__(self, device: str, kind: SlotKind) -> None:
        self.active = LEASES_ACTIVE.labels(device, kind.value)
        self.wait = ACQUIRE_WAIT.labels(kind.value)
        self.by_event = {type_: counter.labels(device, kind.value) for type_, counter in _POOL_COUNTERS.items()}


class BrokerMetrics:
    """Updates the series above; one per broker (the series themselves are process-wide)."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, SlotKind], _PoolSeries] = {}

    def count(self, event: LeaseEvent) -> None:
        """Counts one recorded event (called for every event the broker records)."""
        if event.type is EventType.RENEWED:
            RENEWALS.inc()
        elif event.type is EventType.LEAK_DETECTED:
            LEAKS.labels(event.device).inc()
        elif event.lease is not None:
            self._pool(event.device, event.lease.kind).by_event[event.type].inc()

    def slot_taken(self, lease: Lease) -> None:
        self._pool(lease.device, lease.kind).active.inc()

    def slot_freed(self, lease: Lease) -> None:
        self._pool(lease.device, lease.kind).active.dec()

    def waiter_joined(self, kind: SlotKind) -> None:
        WAITERS.labels(kind.value).inc()

    def waiter_left(self, kind: SlotKind) -> None:
        WAITERS.labels(kind.value).dec()

    def granted_after(self, device: str, kind: SlotKind, seconds: float) -> None:
        """An Acquire was granted `seconds` after it arrived."""
        self._pool(device, kind).wait.observe(seconds)

    def reclaimed_late(self, seconds: float) -> None:
        """A lease was reclaimed `seconds` after its deadline."""
        RECLAIM_DELAY.observe(max(0.0, seconds))

    def _pool(self, device: str, kind: SlotKind) -> _PoolSeries:
        series = self._pools.get((device, kind))
        if series is None:
            series = self._pools[(device, kind)] = _PoolSeries(device, kind)
        return series
