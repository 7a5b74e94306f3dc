"""The gRPC adapter of the broker: decode, call `LeaseBroker`, encode, and map the broker's named
errors to status codes (`BROKER_ERRORS`, the one place that does, applied to every handler by
`mapped_errors`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from mocap.v1 import resource_pb2, resource_pb2_grpc
from mocap_common.errors import (
    Aborted,
    AlreadyExists,
    As,
    DeadlineExceeded,
    ErrorTable,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from mocap_common.paging import page_of
from mocap_common.rpc_errors import mapped_errors
from resource_svc import convert
from resource_svc.broker import LeaseBroker
from resource_svc.leases import (
    BrokerClosed,
    DeviceStatus,
    LeaseLost,
    LeaseNotFound,
    LeaseState,
    NoSlot,
    NoSuchDevice,
    RequestReused,
    StoreFailed,
    Superseded,
)


def _lost_metadata(error: LeaseLost) -> dict[str, object]:
    if error.lease is None:
        return {}
    return {"metadata": {"lease": error.lease.name, "state": error.lease.state.value}}


# The status a client sees for each named broker error. LEASE_LOST is ABORTED, as from the
# tracker and the smoother: the grant is over, so the holder starts again from Acquire.
BROKER_ERRORS: ErrorTable = {
    LeaseLost: As(Aborted, "LEASE_LOST", details=_lost_metadata),
    LeaseNotFound: As(NotFound),
    NoSuchDevice: As(NotFound, "NO_SUCH_DEVICE"),
    NoSlot: As(DeadlineExceeded, "NO_SLOT"),
    RequestReused: As(AlreadyExists, "LEASE_REQUEST_REUSED"),
    Superseded: As(Aborted, "ACQUIRE_SUPERSEDED"),
    BrokerClosed: As(Unavailable, "NOT_READY", retry_after_s=1.0),
    StoreFailed: As(Unavailable, "NOT_READY", retry_after_s=1.0),
}


class ResourceServicer(resource_pb2_grpc.ResourceServiceServicer):
    def __init__(self, broker: LeaseBroker) -> None:
        self._broker = broker
        self._closing = asyncio.Event()

    def stop_accepting(self) -> None:
        """Ends keep-alive streams (clients reconnect to the restarted broker)."""
        self._closing.set()

    async def Acquire(self, request: resource_pb2.AcquireRequest, context: grpc.aio.ServicerContext) -> Any:
        with mapped_errors(BROKER_ERRORS):
            acquire = convert.acquire_request(request, context.time_remaining())
            return convert.lease_proto(await self._broker.acquire(acquire))

    async def KeepAlive(self, request_iterator: AsyncIterator[resource_pb2.KeepAliveRequest],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[resource_pb2.KeepAliveResponse]:
        with mapped_errors(BROKER_ERRORS):
            async for request in _until(self._closing, request_iterator):
                name = convert.lease_name(request.name)
                try:
                    lease = await self._broker.renew(name, request.fencing_token)
                except LeaseLost as lost:  # an answer on this stream, not its end
                    state = convert.STATE_TO_PROTO[lost.lease.state] if lost.lease else resource_pb2.LEASE_STATE_UNSPECIFIED
                    yield resource_pb2.KeepAliveResponse(name=name, lost=True, state=state)
                    continue
                yield resource_pb2.KeepAliveResponse(name=name, lost=False, state=resource_pb2.LEASE_STATE_ACTIVE,
                                                     expire_time=convert.timestamp(lease.expire_time))
            if self._closing.is_set():
                raise Unavailable("the broker is shutting down; reconnect", retry_after_s=1.0)

    async def Renew(self, request: resource_pb2.RenewRequest, context: grpc.aio.ServicerContext) -> Any:
        with mapped_errors(BROKER_ERRORS):
            name = convert.lease_name(request.name)
            ttl_s = convert.renew_ttl(request)
            return convert.lease_proto(await self._broker.renew(name, request.fencing_token, ttl_s))

    async def Release(self, request: resource_pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> Any:
        with mapped_errors(BROKER_ERRORS):
            name = convert.lease_name(request.name)
            lease, released = await self._broker.release(name, request.fencing_token)
            return resource_pb2.ReleaseResponse(lease=convert.lease_proto(lease), released=released)

    async def ValidateLease(self, request: resource_pb2.ValidateLeaseRequest,
                            context: grpc.aio.ServicerContext) -> Any:
        with mapped_errors(BROKER_ERRORS):
            name = convert.lease_name(request.name)
            valid, lease = self._broker.validate(name, request.fencing_token)
            response = resource_pb2.ValidateLeaseResponse(valid=valid)
            if lease is not None:
                response.lease.CopyFrom(convert.lease_proto(lease))
            return response

    async def GetLease(self, request: resource_pb2.GetLeaseRequest, context: grpc.aio.ServicerContext) -> Any:
        with mapped_errors(BROKER_ERRORS):
            name = convert.lease_name(request.name)
            return convert.lease_proto(self._broker.get(name))

    async def ListLeases(self, request: resource_pb2.ListLeasesRequest, context: grpc.aio.ServicerContext) -> Any:
        with mapped_errors(BROKER_ERRORS):
            size = convert.page_size(request.page_size)
            before = convert.decode_page_token(request.page_token)
            state: LeaseState | None = convert.lease_state(request.state)
            leases = self._broker.list(state=state, device=request.device, limit=size + 1, before_grant_seq=before)
            response = resource_pb2.ListLeasesResponse(leases=[convert.lease_proto(lease) for lease in leases[:size]])
            if len(leases) > size:
                response.next_page_token = convert.encode_page_token(leases[size - 1].grant_seq)
            return response

    async def ListDevices(self, request: resource_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext) -> Any:
        with mapped_errors(BROKER_ERRORS):
            # Pages are keyed by (kind, index, id): the broker's own order, made strict by the unique id.
            devices = sorted(self._broker.devices(), key=_device_key)
            page, token = page_of(devices, _device_key, request.page_size, request.page_token, list_name="devices")
            return resource_pb2.ListDevicesResponse(devices=[convert.device_proto(d) for d in page],
                                                    next_page_token=token)

    async def WatchLeases(self, request: resource_pb2.WatchLeasesRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[resource_pb2.LeaseEvent]:
        with mapped_errors(BROKER_ERRORS):
            if request.after_seq < 0:
                raise InvalidArgument("invalid after_seq", violations=[FieldViolation("after_seq", "must be >= 0")])
            watch = self._broker.watch(request.after_seq, request.live_only)
            try:
                # Headers go out once the watcher is subscribed: a client that waits for them
                # (wait_for_connection) misses no event that happens afterwards.
                await context.send_initial_metadata(())
                async for event in watch:
                    yield convert.event_proto(event)
            finally:
                await watch.close()


def _device_key(device: DeviceStatus) -> tuple[str, int, str]:
    return device.spec.kind.value, device.spec.index, device.spec.id


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
