"""Client channels reach every replica behind one address: the address forms translate to
gRPC targets (a host name in a comma list is refused with the fix), and a real channel to two
health servers balances round robin over both and keeps working on the survivor when one dies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mocap_common.channels import CHANNEL_OPTIONS, channel_target, open_channel

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("addresses", "target"), [
    ("127.0.0.1:50052", "127.0.0.1:50052"),
    ("tracker:50052", "tracker:50052"),
    ("  tracker:50052 ", "tracker:50052"),
    ("[::1]:50052", "[::1]:50052"),
    ("dns:///tracker.mocap.svc.cluster.local:50052", "dns:///tracker.mocap.svc.cluster.local:50052"),
    ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
    ("unix:/run/mocap/tracker.sock", "unix:/run/mocap/tracker.sock"),
    ("10.0.0.1:50052,10.0.0.2:50052", "ipv4:10.0.0.1:50052,10.0.0.2:50052"),
    ("10.0.0.1:50052, 10.0.0.2:50053 ,10.0.0.3:50054", "ipv4:10.0.0.1:50052,10.0.0.2:50053,10.0.0.3:50054"),
    ("[::1]:50052,[fd00::2]:50052", "ipv6:[::1]:50052,[fd00::2]:50052"),
])
def test_address_forms_become_grpc_targets(addresses: str, target: str) -> None:
    assert channel_target(addresses) == target


def test_a_host_name_in_a_comma_list_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"'tracker-1:50052'.*not an IP literal.*dns:///name:port"):
        channel_target("10.0.0.1:50052,tracker-1:50052")


@pytest.mark.parametrize(("addresses", "words"), [
    ("", "empty service address"),
    ("10.0.0.1:50052,,10.0.0.2:50052", "empty entry"),
    ("10.0.0.1,10.0.0.2:50052", "has no port"),
    ("10.0.0.1:http,10.0.0.2:50052", "no valid port"),
    ("10.0.0.1:0,10.0.0.2:50052", "no valid port"),
    ("10.0.0.1:70000,10.0.0.2:50052", "no valid port"),
    ("10.0.0.1:50052,[::1]:50052", "mixes IPv4 and IPv6"),
    ("::1:50052,10.0.0.2:50052", "brackets"),
])
def test_malformed_comma_lists_are_refused(addresses: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        channel_target(addresses)


def test_channels_balance_round_robin() -> None:
    options = dict(CHANNEL_OPTIONS)
    assert '"round_robin"' in options["grpc.service_config"]


class _CountingHealth(health.HealthServicer):
    """A health servicer that counts the Checks it answered (which replica a call reached)."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def Check(self, request, context):
        self.checks += 1
        return super().Check(request, context)


def _health_server() -> tuple[grpc.Server, _CountingHealth, int]:
    servicer = _CountingHealth()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, port


@pytest.fixture
def replicas() -> Iterator[list[tuple[grpc.Server, _CountingHealth, int]]]:
    started = [_health_server(), _health_server()]
    yield started
    for server, _, _ in started:
        server.stop(0)


async def _check(stub: health_pb2_grpc.HealthStub, tries: int = 20) -> health_pb2.HealthCheckResponse:
    """One Check, tried again on UNAVAILABLE (a call picked for a replica that just died fails
    fast; the next one goes to a live replica) — a bounded number of tries, no timing claim."""
    for attempt in range(1, tries + 1):
        try:
            return await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == tries:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def test_one_channel_reaches_both_replicas_and_survives_one_dying(replicas) -> None:
    (first, first_health, first_port), (_, second_health, second_port) = replicas
    channel = open_channel(f"127.0.0.1:{first_port},127.0.0.1:{second_port}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        await channel.channel_ready()
        for _ in range(20):
            assert (await _check(stub)).status == health_pb2.HealthCheckResponse.SERVING
        assert first_health.checks + second_health.checks == 20
        assert first_health.checks > 0 and second_health.checks > 0, (first_health.checks, second_health.checks)

        first.stop(0).wait()
        before = second_health.checks
        for _ in range(10):
            assert (await _check(stub)).status == health_pb2.HealthCheckResponse.SERVING
        assert second_health.checks - before == 10  # every call after the death was answered by the survivor
    finally:
        await channel.close()
