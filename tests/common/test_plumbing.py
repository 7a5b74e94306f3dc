"""The shared server bootstrap: health, reflection, rich errors, logs context, metrics, shutdown."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mocap.v1 import smoother_pb2, smoother_pb2_grpc
from mocap_common.config import ServiceConfig
from mocap_common.errors import FieldViolation, InvalidArgument, NotFound
from mocap_common.rpc_errors import describe_rpc_error
from mocap_common.server import ServiceHost


class _ProbeServicer(smoother_pb2_grpc.SmootherServiceServicer):
    """A throwaway servicer that exercises each outcome the interceptor maps."""

    def __init__(self) -> None:
        self.release_order: list[str] = []

    async def ListCheckpoints(self, request, context):
        mode = dict(context.invocation_metadata()).get("mode", "")
        if mode == "invalid":
            raise InvalidArgument("bad window", violations=[FieldViolation("window", "must be 8..64")], retry_after_s=2.5)
        if mode == "missing":
            raise NotFound("no such checkpoint")
        if mode == "crash":
            raise RuntimeError("secret internal detail /etc/passwd")
        if mode == "slow":
            await asyncio.sleep(1.0)
        return smoother_pb2.ListCheckpointsResponse()

    async def Train(self, request, context):
        yield smoother_pb2.TrainResponse(progress=smoother_pb2.TrainProgress(epoch=1))
        raise InvalidArgument("stream failed late", violations=[FieldViolation("epochs", "too many")])


@pytest.fixture
async def host():
    config = ServiceConfig(port=0, metrics_port=0, grace_seconds=2.0)
    h = ServiceHost(config)
    servicer = _ProbeServicer()
    h.add_servicer(smoother_pb2_grpc.add_SmootherServiceServicer_to_server, servicer, smoother_pb2, "SmootherService")
    await h.start()
    h.servicer = servicer
    yield h
    await h.stop(0)


async def _health(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_serving_only_after_ready(host):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        await host.set_serving()
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await _health(channel, "mocap.v1.SmootherService") == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(host):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = set()
        async for response in call:
            names = {s.name for s in response.list_services_response.service}
            break
    assert {"mocap.v1.SmootherService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_service_error_becomes_rich_status(host):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(), metadata=(("mode", "invalid"),))
    details = describe_rpc_error(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_FIELD" and details.domain == "mocapmesh.dev"
    assert details.violations == [FieldViolation("window", "must be 8..64")]
    assert details.retry_after_s == pytest.approx(2.5)


async def test_error_after_stream_messages(host):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        call = stub.Train(smoother_pb2.TrainRequest())
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for msg in call:
                got.append(msg)
    assert len(got) == 1
    assert describe_rpc_error(caught.value).violations == [FieldViolation("epochs", "too many")]


async def test_unexpected_exception_leaks_nothing(host):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(), metadata=(("mode", "crash"),))
    details = describe_rpc_error(caught.value)
    assert details.code == grpc.StatusCode.INTERNAL and details.reason == "INTERNAL"
    assert "passwd" not in details.message and "secret" not in details.message


async def test_graceful_stop_drains_in_flight_calls_and_runs_every_release_step():
    config = ServiceConfig(port=0, metrics_port=0, grace_seconds=5.0)
    host = ServiceHost(config)
    host.add_servicer(smoother_pb2_grpc.add_SmootherServiceServicer_to_server, _ProbeServicer(), smoother_pb2, "SmootherService")
    released: list[str] = []

    def failing_step():
        released.append("failing")
        raise OSError("disk gone")

    host.on_shutdown(lambda: released.append("first"), "first")
    host.on_shutdown(failing_step, "failing")
    await host.start()
    await host.set_serving()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        slow = asyncio.ensure_future(stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(), metadata=(("mode", "slow"),)))
        await asyncio.sleep(0.2)
        await host.stop()
        await slow  # the in-flight call finished inside the grace period
    assert released == ["failing", "first"]


async def test_metrics_endpoint_counts_rpcs():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    host = ServiceHost(ServiceConfig(port=0, metrics_port=metrics_port))
    host.add_servicer(smoother_pb2_grpc.add_SmootherServiceServicer_to_server, _ProbeServicer(), smoother_pb2, "SmootherService")
    await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = smoother_pb2_grpc.SmootherServiceStub(channel)
            await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest())
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(), metadata=(("mode", "missing"),))
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode())
    finally:
        await host.stop(0)
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="ListCheckpoints"' in body
    assert 'grpc_code="NOT_FOUND",grpc_method="ListCheckpoints"' in body
