"""The gRPC adapter of the broker: decode, call `LeaseBroker`, encode, and map the broker's named
errors to status codes (in `_status_for`, the one place that does)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from mocap.v1 import resource_pb2, resource_pb2_grpc
from mocap_common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from resource_svc import convert
from resource_svc.broker import LeaseBroker
from resource_svc.leases import (
    BrokerClosed,
    BrokerError,
    LeaseLost,
    LeaseNotFound,
    LeaseState,
    NoSlot,
    NoSuchDevice,
    RequestReused,
    StoreFailed,
    Superseded,
)


def _status_for(error: BrokerError) -> ServiceError:
    """The status a client sees for each named broker error."""
    message = str(error)
    if isinstance(error, LeaseLost):
        metadata = {}
        if error.lease is not None:
            metadata = {"lease": error.lease.name, "state": error.lease.state.value}
        return FailedPrecondition(message, reason="LEASE_LOST", metadata=metadata)
    if isinstance(error, LeaseNotFound):
        return NotFound(message)
    if isinstance(error, NoSuchDevice):
        return NotFound(message, reason="NO_SUCH_DEVICE")
    if isinstance(error, NoSlot):
        return DeadlineExceeded(message, reason="NO_SLOT")
    if isinstance(error, RequestReused):
        return AlreadyExists(message, reason="LEASE_REQUEST_REUSED")
    if isinstance(error, Superseded):
        return Aborted(message, reason="ACQUIRE_SUPERSEDED")
    if isinstance(error, (BrokerClosed, StoreFailed)):
        return Unavailable(message, reason="NOT_READY", retry_after_s=1.0)
    raise TypeError(f"unmapped broker error {error!r}")


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except BrokerError as error:
        raise _status_for(error) from None


class ResourceServicer(resource_pb2_grpc.ResourceServiceServicer):
    def __init__(self, broker: LeaseBroker) -> None:
        self._broker = broker
        self._closing = asyncio.Event()

    def stop_accepting(self) -> None:
        """Ends keep-alive streams (clients reconnect to the restarted broker)."""
        self._closing.set()

    async def Acquire(self, request: resource_pb2.AcquireRequest, context: grpc.aio.ServicerContext) -> Any:
        acquire = convert.acquire_request(request, context.time_remaining())
        with _mapped_errors():
            lease = await self._broker.acquire(acquire)
        return convert.lease_proto(lease)

    async def KeepAlive(self, request_iterator: AsyncIterator[resource_pb2.KeepAliveRequest],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[resource_pb2.KeepAliveResponse]:
        async for request in _until(self._closing, request_iterator):
            name = convert.lease_name(request.name)
            try:
                lease = await self._broker.renew(name, request.fencing_token)
            except LeaseLost as lost:
                state = convert.STATE_TO_PROTO[lost.lease.state] if lost.lease else resource_pb2.LEASE_STATE_UNSPECIFIED
                yield resource_pb2.KeepAliveResponse(name=name, lost=True, state=state)
                continue
            except BrokerError as error:
                raise _status_for(error) from None
            yield resource_pb2.KeepAliveResponse(name=name, lost=False, state=resource_pb2.LEASE_STATE_ACTIVE,
                                                 expire_time=convert.timestamp(lease.expire_time))
        if self._closing.is_set():
            raise Unavailable("the broker is shutting down; reconnect", retry_after_s=1.0)

    async def Renew(self, request: resource_pb2.RenewRequest, context: grpc.aio.ServicerContext) -> Any:
        name = convert.lease_name(request.name)
        ttl_s = convert.renew_ttl(request)
        with _mapped_errors():
            lease = await self._broker.renew(name, request.fencing_token, ttl_s)
        return convert.lease_proto(lease)

    async def Release(self, request: resource_pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> Any:
        name = convert.lease_name(request.name)
        with _mapped_errors():
            lease, released = await self._broker.release(name, request.fencing_token)
        return resource_pb2.ReleaseResponse(lease=convert.lease_proto(lease), released=released)

    async def ValidateLease(self, request: resource_pb2.ValidateLeaseRequest,
                            context: grpc.aio.ServicerContext) -> Any:
        name = convert.lease_name(request.name)
        valid, lease = self._broker.validate(name, request.fencing_token)
        response = resource_pb2.ValidateLeaseResponse(valid=valid)
        if lease is not None:
            response.lease.CopyFrom(convert.lease_proto(lease))
        return response

    async def GetLease(self, request: resource_pb2.GetLeaseRequest, context: grpc.aio.ServicerContext) -> Any:
        name = convert.lease_name(request.name)
        with _mapped_errors():
            return convert.lease_proto(self._broker.get(name))

    async def ListLeases(self, request: resource_pb2.ListLeasesRequest, context: grpc.aio.ServicerContext) -> Any:
        size = convert.page_size(request.page_size)
        before = convert.decode_page_token(request.page_token)
        state: LeaseState | None = convert.lease_state(request.state)
        leases = self._broker.list(state=state, device=request.device, limit=size + 1, before_grant_seq=before)
        response = resource_pb2.ListLeasesResponse(leases=[convert.lease_proto(lease) for lease in leases[:size]])
        if len(leases) > size:
            response.next_page_token = convert.encode_page_token(leases[size - 1].grant_seq)
        return response

    async def ListDevices(self, request: resource_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext) -> Any:
        return resource_pb2.ListDevicesResponse(devices=[convert.device_proto(d) for d in self._broker.devices()])

    async def WatchLeases(self, request: resource_pb2.WatchLeasesRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[resource_pb2.LeaseEvent]:
        if request.after_seq < 0:
            raise InvalidArgument("invalid after_seq", violations=[FieldViolation("after_seq", "must be >= 0")])
        with _mapped_errors():
            watch = self._broker.watch(request.after_seq, request.live_only)
            try:
                # Headers go out once the watcher is subscribed: a client that waits for them
                # (wait_for_connection) misses no event that happens afterwards.
                await context.send_initial_metadata(())
                async for event in watch:
                    yield convert.event_proto(event)
            finally:
                await watch.close()


async def _until(stop: asyncio.Event, iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Items of `iterator` until it ends or `stop` is set (whichever comes first)."""
    stopper = asyncio.ensure_future(stop.wait())
    item: asyncio.Future[Any] | None = None
    try:
        source = aiter(iterator)
        while True:
            item = asyncio.ensure_future(anext(source))
            await asyncio.wait((item, stopper), return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                return
            try:
                value = item.result()
            except StopAsyncIteration:
                return
            item = None
            yield value
    finally:
        stopper.cancel()
        if item is not None:
            item.cancel()
            item.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # ended with the stream: nobody is left to care
