"""The shared server bootstrap: health, reflection, rich errors, logs context, metrics, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mocap.v1 import smoother_pb2, smoother_pb2_grpc
from mocap_common.config import ServiceConfig
from mocap_common.errors import FieldViolation, InvalidArgument, NotFound
from mocap_common.rpc_errors import describe_rpc_error
from mocap_common.server import ServiceHost

REPO = Path(__file__).resolve().parents[2]


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
    released: list[str] = []

    def failing_step():
        released.append("failing")
        raise OSError("disk gone")

    def failing_hook():
        released.append("failing-hook")
        raise RuntimeError("hook broke")

    async with contextlib.AsyncExitStack() as channels:
        async with ServiceHost(config, handle_signals=False) as host:
            host.add_servicer(smoother_pb2_grpc.add_SmootherServiceServicer_to_server, _ProbeServicer(), smoother_pb2,
                              "SmootherService")
            host.on_release(lambda: released.append("first"), "first")
            host.on_release(failing_step, "failing")
            host.on_stopping(failing_hook, "failing-hook")
            host.on_stopping(lambda: released.append(f"stopping, call in flight: {not slow.done()}"), "stopping")
            await host.start()
            channel = await channels.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{host.port}"))
            assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            serving = asyncio.ensure_future(host.serve_until_stopped())
            await asyncio.sleep(0.1)
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
            stub = smoother_pb2_grpc.SmootherServiceStub(channel)
            slow = asyncio.ensure_future(stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(),
                                                              metadata=(("mode", "slow"),)))
            await asyncio.sleep(0.2)
            host.request_stop()
            await serving
            assert released == []  # the stop runs on leaving the `async with`
        # Stopping hooks first, in order, each although the one before failed, with the call still
        # in flight; then the drain (the call finished inside the grace period); then the release
        # steps in reverse order, each although the one before failed.
        assert released == ["failing-hook", "stopping, call in flight: True", "failing", "first"]
        await slow  # it succeeded: not cancelled by the stop


async def test_sigterm_stops_a_serving_host_gracefully():
    config = ServiceConfig(port=0, metrics_port=0, grace_seconds=5.0)
    before = signal.getsignal(signal.SIGTERM)
    released: list[str] = []
    async with ServiceHost(config) as host:
        host.on_stopping(lambda: released.append("stopping"), "stopping")
        host.on_release(lambda: released.append("released"), "released")
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(host.serve_until_stopped(), 10)
    assert released == ["stopping", "released"]
    assert signal.getsignal(signal.SIGTERM) == before  # the host gave the signal back


async def test_a_signal_during_start_up_stops_it_and_releases_what_it_opened():
    config = ServiceConfig(port=0, metrics_port=0, grace_seconds=5.0)
    released: list[str] = []
    started = time.monotonic()
    async with ServiceHost(config) as host:
        host.on_release(lambda: released.append("opened"), "opened")
        await host.start()
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.sleep(30)  # a slow start-up step (loading models): cancelled by the signal
        released.append("not reached")
    assert released == ["opened"]
    assert time.monotonic() - started < 10
    assert asyncio.current_task().cancelling() == 0  # a stop, not a cancellation of the caller


async def test_a_failed_start_up_releases_what_it_opened_and_raises():
    config = ServiceConfig(port=0, metrics_port=0, grace_seconds=30.0)
    released: list[str] = []
    started = time.monotonic()
    with pytest.raises(SystemExit, match="the store is broken"):
        async with ServiceHost(config, handle_signals=False) as host:
            host.on_release(lambda: released.append("opened"), "opened")
            host.on_stopping(lambda: released.append("stopping"), "stopping")
            await host.start()
            raise SystemExit("probe: the store is broken")
    assert released == ["stopping", "opened"]
    assert time.monotonic() - started < 10  # no grace period after a failure


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


async def test_reflection_serves_the_api_with_its_google_api_imports(host):
    """What grpcurl or a dynamic client in another language does: fetch the file of a service by
    reflection with everything it imports (google/api/field_behavior.proto included), build the
    types from that alone, and read the annotations."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        wanted = [reflection_pb2.ServerReflectionRequest(file_containing_symbol="mocap.v1.SmootherService")]
        while wanted:
            async for response in stub.ServerReflectionInfo(iter(wanted)):
                for raw in response.file_descriptor_response.file_descriptor_proto:
                    proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                    files[proto.name] = proto
            known = set(files)
            wanted = [reflection_pb2.ServerReflectionRequest(file_by_filename=dep)
                      for f in files.values() for dep in f.dependency if dep not in known]
    assert {"mocap/v1/smoother.proto", "google/api/field_behavior.proto", "google/api/resource.proto"} <= set(files)
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dep in files[name].dependency:
                add(dep)
            pool.Add(files[name])
            added.add(name)

    add("mocap/v1/smoother.proto")
    request = pool.FindMessageTypeByName("mocap.v1.SmoothRequest")
    assert request.fields_by_name["tracks"].GetOptions().Extensions[field_behavior_pb2.field_behavior] == [
        field_behavior_pb2.REQUIRED]


def test_vendored_google_protos_are_the_installed_wheels():
    """protos/google/ holds copies for buf (which has no network); protoc and the runtime use the
    googleapis-common-protos wheel's files. The copies must not drift from the wheel."""
    wheel = Path(field_behavior_pb2.__file__).parents[2]
    vendored = sorted(p.relative_to(REPO / "protos") for p in (REPO / "protos" / "google").rglob("*.proto"))
    assert vendored and all(str(p).startswith(("google/api/", "google/rpc/")) for p in vendored)
    for relative in vendored:
        assert (REPO / "protos" / relative).read_bytes() == (wheel / relative).read_bytes(), relative
    for imported in _google_imports():
        assert Path(imported) in vendored, f"{imported} is imported by the API but not vendored for buf"


def _google_imports() -> set[str]:
    imports = set()
    for proto in (REPO / "protos" / "mocap" / "v1").glob("*.proto"):
        for line in proto.read_text().splitlines():
            if line.startswith('import "google/') and not line.startswith('import "google/protobuf/'):
                imports.add(line.split('"')[1])
    return imports
