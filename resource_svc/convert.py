"""Protobuf ⇄ broker types, and request validation (field violations name the proto fields)."""

from __future__ import annotations

import base64
import re

from google.protobuf import duration_pb2, timestamp_pb2

from mocap.v1 import resource_pb2
from mocap_common.errors import FieldViolation, InvalidArgument
from mocap_common.limits import REQUEST_ID_RULE, is_valid_request_id
from resource_svc.leases import (
    AcquireRequest,
    DeviceKind,
    DeviceSelector,
    DeviceStatus,
    EventType,
    GpuProcess,
    Holder,
    Lease,
    LeaseEvent,
    LeaseState,
    SlotKind,
)

MIN_TTL_S = 1.0
MAX_TTL_S = 3600.0
DEFAULT_TTL_S = 30.0
MAX_WAIT_S = 3600.0
PRIORITY_RANGE = (-100, 100)
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_LEASE_NAME = re.compile(r"^leases/[A-Za-z0-9_-]{1,64}$")

KIND_TO_PROTO = {SlotKind.TRAINING: resource_pb2.SLOT_KIND_TRAINING, SlotKind.INFERENCE: resource_pb2.SLOT_KIND_INFERENCE}
KIND_FROM_PROTO = {v: k for k, v in KIND_TO_PROTO.items()}
STATE_TO_PROTO = {
    LeaseState.ACTIVE: resource_pb2.LEASE_STATE_ACTIVE,
    LeaseState.RELEASED: resource_pb2.LEASE_STATE_RELEASED,
    LeaseState.RECLAIMED: resource_pb2.LEASE_STATE_RECLAIMED,
}
STATE_FROM_PROTO = {v: k for k, v in STATE_TO_PROTO.items()}
EVENT_TO_PROTO = {
    EventType.GRANTED: resource_pb2.LEASE_EVENT_TYPE_GRANTED,
    EventType.RENEWED: resource_pb2.LEASE_EVENT_TYPE_RENEWED,
    EventType.RELEASED: resource_pb2.LEASE_EVENT_TYPE_RELEASED,
    EventType.RECLAIMED: resource_pb2.LEASE_EVENT_TYPE_RECLAIMED,
    EventType.LEAK_DETECTED: resource_pb2.LEASE_EVENT_TYPE_LEAK_DETECTED,
}
DEVICE_KIND_TO_PROTO = {DeviceKind.GPU: resource_pb2.DEVICE_KIND_GPU, DeviceKind.CPU: resource_pb2.DEVICE_KIND_CPU}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = int(seconds // 1)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds // 1)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


def seconds_of(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


# -- requests --------------------------------------------------------------------------------

def acquire_request(request: resource_pb2.AcquireRequest, time_remaining_s: float | None) -> AcquireRequest:
    """Validates an Acquire. The wait ends a little before the call's deadline so the caller gets
    NO_SLOT with its details rather than its own bare DEADLINE_EXCEEDED."""
    violations = []
    kind = KIND_FROM_PROTO.get(request.kind)
    if kind is None:
        violations.append(FieldViolation("kind", "must be SLOT_KIND_TRAINING or SLOT_KIND_INFERENCE"))
    ttl_s = DEFAULT_TTL_S
    if request.HasField("ttl"):
        ttl_s = seconds_of(request.ttl)
        if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            violations.append(FieldViolation("ttl", f"must be {MIN_TTL_S:g} s .. {MAX_TTL_S:g} s"))
    if not PRIORITY_RANGE[0] <= request.priority <= PRIORITY_RANGE[1]:
        violations.append(FieldViolation("priority", f"must be {PRIORITY_RANGE[0]}..{PRIORITY_RANGE[1]}"))
    if request.request_id and not is_valid_request_id(request.request_id):
        violations.append(FieldViolation("request_id", REQUEST_ID_RULE))
    max_wait_s: float | None = None
    if request.HasField("max_wait"):
        max_wait_s = seconds_of(request.max_wait)
        if not 0 <= max_wait_s <= MAX_WAIT_S:
            violations.append(FieldViolation("max_wait", f"must be 0 .. {MAX_WAIT_S:g} s"))
    if request.holder.pid < 0:
        violations.append(FieldViolation("holder.pid", "must be >= 0"))
    selector, selector_violations = _selector(request.device)
    violations += selector_violations
    if violations:
        raise InvalidArgument("invalid Acquire request", violations=violations)
    if time_remaining_s is not None:
        margin = min(0.25, max(0.02, time_remaining_s * 0.05))
        by_deadline = max(0.0, time_remaining_s - margin)
        max_wait_s = by_deadline if max_wait_s is None else min(max_wait_s, by_deadline)
    h = request.holder
    assert kind is not None
    return AcquireRequest(kind=kind, selector=selector, holder=Holder(h.service, h.job, h.pid, h.host), ttl_s=ttl_s,
                          priority=request.priority, request_id=request.request_id, max_wait_s=max_wait_s)


def _selector(device: resource_pb2.DeviceSelector) -> tuple[DeviceSelector, list[FieldViolation]]:
    violations = []
    if device.min_free_memory_bytes < 0:
        violations.append(FieldViolation("device.min_free_memory_bytes", "must be >= 0"))
    which = device.WhichOneof("selector")
    if which == "index":
        if device.index < 0:
            violations.append(FieldViolation("device.index", "must be >= 0"))
        return DeviceSelector(index=device.index, min_free_memory_bytes=device.min_free_memory_bytes), violations
    if which == "uuid":
        if not device.uuid.strip():
            violations.append(FieldViolation("device.uuid", "must not be empty"))
        return DeviceSelector(uuid=device.uuid.strip(), min_free_memory_bytes=device.min_free_memory_bytes), violations
    return DeviceSelector(min_free_memory_bytes=device.min_free_memory_bytes), violations


def lease_name(name: str, field: str = "name") -> str:
    if not _LEASE_NAME.match(name):
        raise InvalidArgument(f"invalid lease name {name!r}",
                              violations=[FieldViolation(field, 'must look like "leases/{lease}"')])
    return name


def renew_ttl(request: resource_pb2.RenewRequest) -> float | None:
    if not request.HasField("ttl"):
        return None
    ttl_s = seconds_of(request.ttl)
    if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise InvalidArgument("invalid ttl", violations=[FieldViolation("ttl", f"must be {MIN_TTL_S:g} s .. "
                                                                               f"{MAX_TTL_S:g} s")])
    return ttl_s


def page_size(value: int) -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidArgument("invalid page_size",
                              violations=[FieldViolation("page_size", f"must be 0..{MAX_PAGE_SIZE} (0 = 100)")])
    return value or DEFAULT_PAGE_SIZE


def encode_page_token(grant_seq: int) -> str:
    return base64.urlsafe_b64encode(f"g{grant_seq}".encode()).decode()


def decode_page_token(token: str) -> int | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if not text.startswith("g"):
            raise ValueError(text)
        return int(text[1:])
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("invalid page_token", violations=[
            FieldViolation("page_token", "must be a next_page_token from a previous response")]) from None


def lease_state(value: int) -> LeaseState | None:
    if value == resource_pb2.LEASE_STATE_UNSPECIFIED:
        return None
    state = STATE_FROM_PROTO.get(value)
    if state is None:
        raise InvalidArgument("invalid state", violations=[FieldViolation("state", "unknown LeaseState")])
    return state


# -- responses -------------------------------------------------------------------------------

def lease_proto(lease: Lease) -> resource_pb2.Lease:
    h = lease.holder
    return resource_pb2.Lease(
        name=lease.name, device=lease.device, device_uuid=lease.device_uuid, device_index=lease.device_index,
        kind=KIND_TO_PROTO[lease.kind], slot=lease.slot, fencing_token=lease.fencing_token,
        state=STATE_TO_PROTO[lease.state],
        holder=resource_pb2.Holder(service=h.service, job=h.job, pid=h.pid, host=h.host),
        ttl=duration(lease.ttl_s), priority=lease.priority, grant_time=timestamp(lease.grant_time),
        expire_time=timestamp(lease.expire_time), request_id=lease.request_id,
        renew_time=timestamp(lease.renew_time),
    )


def process_proto(process: GpuProcess) -> resource_pb2.GpuProcess:
    return resource_pb2.GpuProcess(pid=process.pid, used_memory_bytes=process.used_memory_bytes,
                                   unleased=process.unleased)


def event_proto(event: LeaseEvent) -> resource_pb2.LeaseEvent:
    message = resource_pb2.LeaseEvent(seq=event.seq, time=timestamp(event.time), type=EVENT_TO_PROTO[event.type],
                                      device=event.device)
    if event.lease is not None:
        message.lease.CopyFrom(lease_proto(event.lease))
    if event.process is not None:
        message.process.CopyFrom(process_proto(event.process))
    return message


def device_proto(status: DeviceStatus) -> resource_pb2.Device:
    spec, figures = status.spec, status.figures
    return resource_pb2.Device(
        id=spec.id, kind=DEVICE_KIND_TO_PROTO[spec.kind], index=spec.index, uuid=spec.uuid, name=spec.name,
        memory_total_bytes=spec.memory_total_bytes, memory_used_bytes=figures.memory_used_bytes,
        utilization_percent=figures.utilization_percent,
        slots=[resource_pb2.SlotUsage(kind=KIND_TO_PROTO[s.kind], total=s.total, used=s.used, waiting=s.waiting)
               for s in status.slots],
        processes=[process_proto(p) for p in figures.processes],
        refresh_time=timestamp(figures.refresh_time),
    )
