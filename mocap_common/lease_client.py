"""Client of resource_svc, the GPU lease broker.

    async with lease("127.0.0.1:50055", kind="inference", holder_service="tracker", job=job) as held:
        model.to(held.torch_device())
        ...                                   # cancelled if the lease is lost; LeaseLost is raised
        if not await held.validate():         # before publishing work done under the lease
            raise ...

`lease()` acquires (waiting for a free slot, bounded by `acquire_timeout_s`), keeps the lease alive
in the background over the broker's KeepAlive stream (every ttl/3, reconnecting while the lease
can still be saved), and releases it on every way out of the block. When the lease is lost the
`lost` event is set and, with `cancel_on_loss`, the block's task is cancelled; the block then ends
with `LeaseLost`. A lease counts as lost when the broker says so, or when no renewal has been
confirmed and the lease's deadline is about to pass (the holder gives up slightly before the
broker reclaims, so it stops before anyone else can be granted the slot).

Errors from the broker are raised as `mocap_common.errors.ServiceError`s: `DeadlineExceeded`
(reason NO_SLOT) when no slot freed in time, `Unavailable` (NOT_READY) when the broker cannot be
reached, `NotFound` (NO_SUCH_DEVICE), `Aborted` (LEASE_LOST: that grant is over; acquire again),
`InvalidArgument`, ... (the class follows the status code, one code per reason across the mesh).
Their messages, and the reasons a
lease is lost (`LeaseLost`), travel on to the holder's callers (a tracker puts them into its own
errors, and the gateway shows those to clients): they never carry gRPC's transport text (peer
addresses such as "ipv4:127.0.0.1:50055", "Failed to connect to remote host"), which only the log
gets.

`LeaseClient` is the lower-level client (one channel, every RPC) that `lease()`, the `lease` CLI
and the benchmark share.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2

from mocap.v1 import resource_pb2, resource_pb2_grpc
from mocap_common import errors
from mocap_common.channels import open_channel
from mocap_common.logs import get_logger
from mocap_common.procs import finish_uncancellable
from mocap_common.rpc_errors import describe_rpc_error

log = get_logger(__name__)

DEFAULT_ADDR = "127.0.0.1:50055"
ADDR_ENV = "MOCAP_RESOURCE_ADDR"
_KINDS = {"training": resource_pb2.SLOT_KIND_TRAINING, "inference": resource_pb2.SLOT_KIND_INFERENCE}
# Extra time the call deadline gives the broker beyond max_wait, so its NO_SLOT answer arrives.
_ACQUIRE_DEADLINE_SLACK_S = 5.0
_RPC_TIMEOUT_S = 10.0


class LeaseLost(Exception):
    """The lease ended (reclaimed, released elsewhere, or could not be renewed) while held."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"lease {name} was lost: {reason}")
        self.name = name
        self.reason = reason


@dataclass
class HeldLease:
    """A lease held inside `async with lease(...)`."""

    name: str
    device: str
    device_index: int
    device_uuid: str
    kind: str
    fencing_token: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set when the lease is gone
    slot: int = 0
    lost_reason: str = ""
    _client: "LeaseClient | None" = field(default=None, repr=False)

    def torch_device(self) -> str:
        """"cuda:<index>" for GPUs (NVML numbering, i.e. with all GPUs visible), "cpu" for CPU devices."""
        return f"cuda:{self.device_index}" if self.device_index >= 0 else "cpu"

    async def validate(self) -> bool:
        """Whether the broker still has this lease with this fencing token (ValidateLease)."""
        if self._client is None:
            raise RuntimeError("this HeldLease is not attached to a client")
        return await self._client.validate(self.name, self.fencing_token)


def default_address() -> str:
    return os.environ.get(ADDR_ENV) or DEFAULT_ADDR


def device_selector(device: str, min_free_memory_bytes: int = 0) -> resource_pb2.DeviceSelector:
    """"any", a device index ("0"), an NVML UUID ("GPU-...") or a device id ("gpu:1", "cpu:0")."""
    device = device.strip()
    selector = resource_pb2.DeviceSelector(min_free_memory_bytes=min_free_memory_bytes)
    if device in ("", "any"):
        selector.any = True
    elif device.isdigit():
        selector.index = int(device)
    else:
        selector.uuid = device
    return selector


# A failed broker call that carries no ErrorInfo of the mesh was answered by gRPC itself (the
# broker unreachable, a reset connection, our deadline): its message is transport text, so the
# error says this instead.
_TRANSPORT_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "the lease broker could not be reached",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the lease broker did not answer in time",
    grpc.StatusCode.CANCELLED: "the call to the lease broker was cancelled",
}


def service_error(error: grpc.RpcError) -> errors.ServiceError:
    """The `ServiceError` a failed broker call stands for (code, reason, message, details).
    The message is the broker's own, or a fixed text when gRPC made the error up (see above)."""
    details = describe_rpc_error(error)
    cls = _ERROR_CLASSES.get(details.code, errors.Internal)
    reason = details.reason or None
    if reason is not None:
        try:
            errors.reason_name(reason)
        except ValueError:  # a newer broker's reason: keep the code, drop the reason
            reason = None
    if details.code == grpc.StatusCode.DEADLINE_EXCEEDED and reason is None:
        reason = "NO_SLOT"  # our own deadline passed before the broker answered
    if details.code == grpc.StatusCode.UNAVAILABLE and reason is None:
        reason = "NOT_READY"
    if details.domain == errors.ERROR_DOMAIN:
        message = details.message or details.code.name
    else:
        message = _TRANSPORT_MESSAGES.get(details.code, f"the call to the lease broker failed ({details.code.name})")
        log.info("lease broker call failed", code=details.code.name, detail=details.message)
    return cls(message, reason=reason, violations=details.violations, retry_after_s=details.retry_after_s,
               metadata=details.metadata)


def _failure_summary(error: BaseException) -> str:
    """A failed keep-alive in words fit for a `LeaseLost` reason (no transport text)."""
    if isinstance(error, grpc.RpcError):
        details = describe_rpc_error(error)
        if details.domain == errors.ERROR_DOMAIN:
            return f"{details.code.name} [{details.reason}]" if details.reason else details.code.name
        return _TRANSPORT_MESSAGES.get(details.code, f"the keep-alive stream failed ({details.code.name})")
    if isinstance(error, ConnectionError):
        return "the broker closed the keep-alive stream"
    return f"the keep-alive stream failed ({type(error).__name__})"


_ERROR_CLASSES: dict[grpc.StatusCode, type[errors.ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class LeaseClient:
    """One channel to the broker and every call on it; `hold()` is `lease()` on this channel."""

    def __init__(self, target: str | None = None, *, channel: grpc.aio.Channel | None = None) -> None:
        self.target = target or default_address()
        self._channel = channel or open_channel(self.target)
        self._owns_channel = channel is None
        self.stub = resource_pb2_grpc.ResourceServiceStub(self._channel)

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> "LeaseClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise service_error(error) from None

    async def acquire(self, *, kind: str, holder_service: str, job: str = "", device: str = "any",
                      ttl_s: float = 30.0, priority: int = 0, request_id: str | None = None,
                      acquire_timeout_s: float | None = None, min_free_memory_bytes: int = 0,
                      pid: int | None = None) -> resource_pb2.Lease:
        """Acquire; waits up to `acquire_timeout_s` (None: as long as it takes) for a free slot."""
        if kind not in _KINDS:
            raise errors.InvalidArgument(f"kind must be training or inference, not {kind!r}",
                                         violations=[errors.FieldViolation("kind", "training or inference")])
        request = resource_pb2.AcquireRequest(
            kind=_KINDS[kind], device=device_selector(device, min_free_memory_bytes),
            holder=resource_pb2.Holder(service=holder_service, job=job, pid=os.getpid() if pid is None else pid,
                                       host=socket.gethostname()),
            ttl=_duration(ttl_s), priority=priority, request_id=request_id or uuid.uuid4().hex,
        )
        timeout = None
        if acquire_timeout_s is not None:
            request.max_wait.CopyFrom(_duration(acquire_timeout_s))
            timeout = acquire_timeout_s + _ACQUIRE_DEADLINE_SLACK_S
        return await self._call(self.stub.Acquire, request, timeout)

    async def release(self, name: str, fencing_token: int,
                      timeout_s: float = _RPC_TIMEOUT_S) -> resource_pb2.ReleaseResponse:
        return await self._call(self.stub.Release,
                                resource_pb2.ReleaseRequest(name=name, fencing_token=fencing_token), timeout_s)

    async def renew(self, name: str, fencing_token: int, ttl_s: float | None = None,
                    timeout_s: float = _RPC_TIMEOUT_S) -> resource_pb2.Lease:
        request = resource_pb2.RenewRequest(name=name, fencing_token=fencing_token)
        if ttl_s is not None:
            request.ttl.CopyFrom(_duration(ttl_s))
        return await self._call(self.stub.Renew, request, timeout_s)

    async def validate(self, name: str, fencing_token: int, timeout_s: float = _RPC_TIMEOUT_S) -> bool:
        response = await self._call(self.stub.ValidateLease,
                                    resource_pb2.ValidateLeaseRequest(name=name, fencing_token=fencing_token),
                                    timeout_s)
        return bool(response.valid)

    async def get(self, name: str, timeout_s: float = _RPC_TIMEOUT_S) -> resource_pb2.Lease:
        return await self._call(self.stub.GetLease, resource_pb2.GetLeaseRequest(name=name), timeout_s)

    async def list_devices(self, timeout_s: float = _RPC_TIMEOUT_S) -> list[resource_pb2.Device]:
        response = await self._call(self.stub.ListDevices, resource_pb2.ListDevicesRequest(), timeout_s)
        return list(response.devices)

    async def list_leases(self, *, state: int = resource_pb2.LEASE_STATE_UNSPECIFIED, device: str = "",
                          limit: int | None = None, timeout_s: float = _RPC_TIMEOUT_S) -> list[resource_pb2.Lease]:
        """Leases newest first, following pages until `limit` (None: all the broker keeps)."""
        leases: list[resource_pb2.Lease] = []
        token = ""
        while limit is None or len(leases) < limit:
            page = min(1000, limit - len(leases)) if limit is not None else 1000
            response = await self._call(self.stub.ListLeases, resource_pb2.ListLeasesRequest(
                page_size=page, page_token=token, state=state, device=device), timeout_s)
            leases.extend(response.leases)
            token = response.next_page_token
            if not token:
                break
        return leases

    async def watch(self, after_seq: int = 0, live_only: bool = False) -> AsyncIterator[resource_pb2.LeaseEvent]:
        """Lease events after `after_seq` (or from now on, `live_only`), then live ones, until the
        stream ends or fails."""
        call = self.stub.WatchLeases(resource_pb2.WatchLeasesRequest(after_seq=after_seq, live_only=live_only))
        try:
            async for event in call:
                yield event
        except grpc.RpcError as error:
            raise service_error(error) from None
        finally:
            call.cancel()

    @contextlib.asynccontextmanager
    async def hold(self, *, kind: str, holder_service: str, job: str = "", device: str = "any",
                   ttl_s: float = 30.0, priority: int = 0, request_id: str | None = None,
                   acquire_timeout_s: float | None = None, cancel_on_loss: bool = True,
                   min_free_memory_bytes: int = 0, release_timeout_s: float = 5.0) -> AsyncIterator[HeldLease]:
        """`lease()` on this client's channel; see the module docstring."""
        granted = await self.acquire(kind=kind, holder_service=holder_service, job=job, device=device, ttl_s=ttl_s,
                                     priority=priority, request_id=request_id, acquire_timeout_s=acquire_timeout_s,
                                     min_free_memory_bytes=min_free_memory_bytes)
        received = asyncio.get_running_loop().time()
        held = HeldLease(name=granted.name, device=granted.device, device_index=granted.device_index,
                         device_uuid=granted.device_uuid, kind=kind, fencing_token=granted.fencing_token,
                         slot=granted.slot, _client=self)
        body = asyncio.current_task()
        in_body = True
        cancelled_for_loss = False
        told_by_broker = False

        def lose(reason: str, by_broker: bool) -> None:
            nonlocal cancelled_for_loss, told_by_broker
            if held.lost.is_set():
                return
            held.lost_reason, told_by_broker = reason, by_broker
            held.lost.set()
            log.warning("lease lost", lease=held.name, device=held.device, reason=reason)
            if cancel_on_loss and in_body and body is not None and not body.done():
                cancelled_for_loss = True
                body.cancel(msg=f"lease {held.name} lost")

        ttl = seconds_of(granted.ttl) or ttl_s
        keeper = asyncio.create_task(_keep_alive(self.stub, held, ttl, received, lose), name=f"keepalive {held.name}")
        try:
            yield held
        except asyncio.CancelledError:
            if cancelled_for_loss and body is not None and body.uncancel() == 0:
                raise LeaseLost(held.name, held.lost_reason) from None
            raise  # cancelled from outside too: cancellation wins
        except BaseException as error:
            if cancelled_for_loss and body is not None:
                body.uncancel()  # the block turned our cancellation into another error
                raise LeaseLost(held.name, held.lost_reason) from error
            raise
        else:
            if held.lost.is_set():
                if cancelled_for_loss and body is not None:
                    body.uncancel()  # the block swallowed our cancellation
                raise LeaseLost(held.name, held.lost_reason)
        finally:
            in_body = False
            # One uncancellable step: stop the keeper, then release (unless the broker already
            # ended the lease). A release failure is logged, never raised over the block's outcome.
            await finish_uncancellable(self._let_go(held, keeper, not told_by_broker, release_timeout_s))

    async def _let_go(self, held: HeldLease, keeper: asyncio.Task[None], release: bool, timeout_s: float) -> None:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        if not release:
            return
        try:
            response = await self.release(held.name, held.fencing_token, timeout_s=timeout_s)
            log.debug("lease released", lease=held.name, released=response.released)
        except errors.ServiceError as error:
            if error.reason != "LEASE_LOST":
                log.warning("lease release failed; the broker reclaims it after its TTL", lease=held.name,
                            error=str(error), reason=error.reason)


def seconds_of(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


async def _keep_alive(stub: resource_pb2_grpc.ResourceServiceStub, held: HeldLease, ttl_s: float,
                      granted_at: float, lose: Callable[[str, bool], None]) -> None:
    """Renews `held` every ttl/3 over a KeepAlive stream, reconnecting after failures, until the
    broker says it is lost or no renewal was confirmed in time.

    Times are the loop's monotonic clock. After a confirmed renewal the broker's deadline is at
    least send time + ttl; the holder gives up `margin` before that, so it stops before the broker
    can hand the slot to anyone else.
    """
    loop = asyncio.get_running_loop()
    margin = min(0.5, ttl_s * 0.1)
    give_up_at = granted_at + ttl_s - 2 * margin  # the grant's receipt is after the broker's grant time
    interval = ttl_s / 3
    request = resource_pb2.KeepAliveRequest(name=held.name, fencing_token=held.fencing_token)
    backoff = 0.05
    first = True
    while True:
        try:
            async with asyncio.timeout_at(give_up_at) as limit:
                if first:
                    first = False
                    await asyncio.sleep(interval)
                call = stub.KeepAlive()
                try:
                    while True:
                        sent = loop.time()
                        await call.write(request)
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            raise ConnectionError("keep-alive stream closed by the broker")
                        if response.lost:
                            state = resource_pb2.LeaseState.Name(response.state)
                            lose(f"the broker reports it gone ({state})", True)
                            return
                        give_up_at = sent + ttl_s - margin
                        limit.reschedule(give_up_at)
                        backoff = 0.05
                        await asyncio.sleep(interval)
                finally:
                    call.cancel()
        except TimeoutError:
            lose(f"no renewal confirmed within its {ttl_s:g} s TTL (broker unreachable?)", False)
            return
        except Exception as error:  # noqa: BLE001 - any broken stream: reconnect while there is time
            if isinstance(error, grpc.RpcError):
                details = describe_rpc_error(error)
                if details.reason == "LEASE_LOST" or details.code == grpc.StatusCode.INVALID_ARGUMENT:
                    log.info("keep-alive refused by the broker", lease=held.name, error=str(details))
                    lose(f"the broker refused to renew it ({details.reason or details.code.name})", True)
                    return
                detail_text = str(details)
            else:
                detail_text = str(error)
            log.info("keep-alive stream broke; reconnecting", lease=held.name, error=detail_text)
            if loop.time() + backoff >= give_up_at:
                await asyncio.sleep(max(0.0, give_up_at - loop.time()))
                lose(f"no renewal confirmed within its {ttl_s:g} s TTL (last error: {_failure_summary(error)})", False)
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)


@contextlib.asynccontextmanager
async def lease(target: str | None = None, *, kind: str, holder_service: str, job: str = "", device: str = "any",
                ttl_s: float = 30.0, priority: int = 0, request_id: str | None = None,
                acquire_timeout_s: float | None = None, cancel_on_loss: bool = True,
                min_free_memory_bytes: int = 0) -> AsyncIterator[HeldLease]:
    """Holds a lease for the block: acquire, keep alive, release on every exit (see module doc).

    `target` defaults to $MOCAP_RESOURCE_ADDR or 127.0.0.1:50055; `device` is "any", an index,
    an NVML UUID or a device id such as "cpu:0".
    """
    client = LeaseClient(target)
    try:
        async with client.hold(kind=kind, holder_service=holder_service, job=job, device=device, ttl_s=ttl_s,
                               priority=priority, request_id=request_id, acquire_timeout_s=acquire_timeout_s,
                               cancel_on_loss=cancel_on_loss, min_free_memory_bytes=min_free_memory_bytes) as held:
            yield held
    finally:
        await finish_uncancellable(client.close())
