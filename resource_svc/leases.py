"""What the broker deals in: devices, slots, holders, leases, events — and the errors it names.

Plain data, no gRPC and no I/O. `server.py` converts these to and from protobuf and maps the
errors below to status codes in one place.

    BrokerError
    ├── LeaseNotFound       no such lease (GetLease)                   → NOT_FOUND
    ├── LeaseLost           ended, stale or foreign token              → ABORTED LEASE_LOST
    ├── NoSuchDevice        the selector matches no device             → NOT_FOUND NO_SUCH_DEVICE
    ├── NoSlot              no slot freed before the wait ran out      → DEADLINE_EXCEEDED NO_SLOT
    ├── RequestReused       request_id reused for another request      → ALREADY_EXISTS LEASE_REQUEST_REUSED
    ├── Superseded          a retry took this waiting call's place     → ABORTED ACQUIRE_SUPERSEDED
    ├── BrokerClosed        the broker is shutting down                → UNAVAILABLE NOT_READY
    └── StoreFailed         the lease table could not be written       → UNAVAILABLE NOT_READY
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BrokerError(Exception):
    """Base of every error the broker names."""


class LeaseNotFound(BrokerError):
    """The broker knows no lease by that name (never granted, or pruned from its history)."""


class LeaseLost(BrokerError):
    """The lease is not held with that token: it ended (released, reclaimed) or the token is stale."""

    def __init__(self, message: str, lease: "Lease | None" = None) -> None:
        super().__init__(message)
        self.lease = lease


class NoSuchDevice(BrokerError):
    """No device matches the selector (or none could ever satisfy its memory requirement)."""


class NoSlot(BrokerError):
    """No slot became free before the caller's wait ran out."""


class RequestReused(BrokerError):
    """A request_id was sent again with a different request."""


class Superseded(BrokerError):
    """A retry with the same request_id took this waiting call's place in the queue."""


class BrokerClosed(BrokerError):
    """The broker is shutting down; retry against the restarted broker."""


class StoreFailed(BrokerError):
    """The lease table could not be written; the change was not acknowledged."""


class SlotKind(str, enum.Enum):
    TRAINING = "training"
    INFERENCE = "inference"


class LeaseState(str, enum.Enum):
    ACTIVE = "active"
    RELEASED = "released"
    RECLAIMED = "reclaimed"


class EventType(str, enum.Enum):
    GRANTED = "granted"
    RENEWED = "renewed"
    RELEASED = "released"
    RECLAIMED = "reclaimed"
    LEAK_DETECTED = "leak_detected"


class DeviceKind(str, enum.Enum):
    GPU = "gpu"
    CPU = "cpu"


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lease: reported in events and listings, and used to tell leaked GPU memory."""

    service: str = ""
    job: str = ""
    pid: int = 0
    host: str = ""


@dataclass(frozen=True, slots=True)
class DeviceSelector:
    """Which devices an Acquire may be granted on: any (index and uuid None), one index or one id/uuid."""

    index: int | None = None
    uuid: str | None = None  # an NVML UUID or a device id such as "cpu:0" or "gpu:1"
    min_free_memory_bytes: int = 0

    def describe(self) -> str:
        where = "any" if self.index is None and self.uuid is None else (
            f"index {self.index}" if self.index is not None else repr(self.uuid))
        return where + (f", >= {self.min_free_memory_bytes} B free" if self.min_free_memory_bytes else "")


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    kind: SlotKind
    selector: DeviceSelector = DeviceSelector()
    holder: Holder = Holder()
    ttl_s: float = 30.0
    priority: int = 0
    request_id: str = ""
    # Seconds to wait for a free slot; None = until the caller goes away, 0 = do not wait.
    max_wait_s: float | None = None

    def fingerprint(self) -> str:
        """What must match for a retry with the same request_id to count as the same request. Not
        the holder's pid or host: a client that restarted may retry its request."""
        s, h = self.selector, self.holder
        return (f"{self.kind.value}|{s.index}|{s.uuid}|{s.min_free_memory_bytes}|{h.service}|{h.job}|"
                f"{self.ttl_s:g}|{self.priority}")


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process NVML reports holding memory on a device."""

    pid: int
    used_memory_bytes: int = 0
    unleased: bool = False


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device's identity; `key` (the NVML UUID, or the CPU device id) names it in the lease table,
    so slot tokens stay attached to the physical GPU even if NVML renumbers devices."""

    id: str  # "gpu:0", "cpu:0"
    kind: DeviceKind
    index: int
    uuid: str = ""
    name: str = ""
    memory_total_bytes: int = 0

    @property
    def key(self) -> str:
        return self.uuid or self.id

    @property
    def cuda_index(self) -> int:
        return self.index if self.kind is DeviceKind.GPU else -1


@dataclass(frozen=True, slots=True)
class DeviceFigures:
    """Live NVML figures of a device (all zero for CPU devices)."""

    memory_used_bytes: int = 0
    utilization_percent: int = 0
    processes: tuple[GpuProcess, ...] = ()
    refresh_time: float = 0.0


@dataclass(slots=True)
class Lease:
    """One grant of one slot. The broker mutates its own copy; everyone else gets `snapshot()`s."""

    name: str  # "leases/{id}"
    device: str
    device_key: str
    device_uuid: str
    device_index: int  # as CUDA_VISIBLE_DEVICES wants it; -1 for CPU devices
    kind: SlotKind
    slot: int
    fencing_token: int
    state: LeaseState
    holder: Holder
    ttl_s: float
    priority: int
    grant_time: float
    expire_time: float  # for ended leases: when it ended
    renew_time: float
    request_id: str = ""
    grant_seq: int = 0  # seq of its GRANTED event: orders leases by grant
    fingerprint: str = ""

    def snapshot(self) -> "Lease":
        # Spelled out: on the hot path, 8x cheaper than dataclasses.replace.
        return Lease(self.name, self.device, self.device_key, self.device_uuid, self.device_index, self.kind,
                     self.slot, self.fencing_token, self.state, self.holder, self.ttl_s, self.priority,
                     self.grant_time, self.expire_time, self.renew_time, self.request_id, self.grant_seq,
                     self.fingerprint)

    @property
    def slot_key(self) -> tuple[str, SlotKind, int]:
        return (self.device_key, self.kind, self.slot)


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    """Something that happened, with a broker-wide seq that increases by one per event."""

    seq: int
    time: float
    type: EventType
    device: str
    lease: Lease | None = None  # as it was right after the event
    process: GpuProcess | None = None  # LEAK_DETECTED only


@dataclass(frozen=True, slots=True)
class SlotUsage:
    kind: SlotKind
    total: int
    used: int
    waiting: int


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A device as ListDevices shows it."""

    spec: DeviceSpec
    figures: DeviceFigures
    slots: tuple[SlotUsage, ...]
