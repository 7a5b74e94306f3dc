"""What reaches a client of a stage's error: no peer addresses, IP literals, file paths or text of
gRPC core's own errors (the detail stays in the logs). Unit tests of the sanitiser on the strings
gRPC really produces, of the lease client's error texts against a real unreachable broker, and of
the stage retry schedule."""

from __future__ import annotations

import random

import pytest

from gateway.messages import safe_message
from gateway.pipeline import RetrySchedule
from mocap_common.errors import ServiceError
from mocap_common.lease_client import LeaseClient
from tests.gateway.leaks import LEAKS
from tests.support import free_port

# Texts as gRPC core (grpcio 1.6x-1.8x), the lease client before its fix and peers produce them.
GRPC_TEXTS = [
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50055: Failed to connect to remote host: "
    "Connection refused",
    "the inference lease was lost; tracking stopped (lease leases/l-4f2a was lost: no renewal confirmed within its "
    "10 s TTL (last error: UNAVAILABLE [NOT_READY]: failed to connect to all addresses; last error: UNKNOWN: "
    "ipv4:127.0.0.1:50055: Failed to connect to remote host: Connection refused))",
    "failed to connect to all addresses; last error: UNKNOWN: ipv6:%5B::1%5D:50055: Failed to connect to remote host: "
    "Connection refused",
    "DNS resolution failed for tracker.svc.cluster.local:50052: C-ares status is not ARES_SUCCESS qtype=A "
    "name=tracker.svc.cluster.local is_balancer=0: Domain name not found",
    "recvmsg:Connection reset by peer",
    "Socket closed",
    "Received message larger than max (73400330 vs. 67108864)",
    "<AioRpcError of RPC that terminated with:\n\tstatus = StatusCode.UNAVAILABLE\n\tdetails = \"failed to connect "
    "to all addresses; last error: UNKNOWN: ipv4:10.0.3.7:50052: Failed to connect to remote host: Connection "
    "refused\"\n\tdebug_error_string = \"UNKNOWN:Error received from peer  {grpc_message:\"failed to connect to all "
    "addresses\", grpc_status:14, created_time:\"2026-12-04T20:10:41.1+00:00\"}\"\n>",
    "the exporter at 10.0.0.5:50054 could not read /var/lib/exporter/work/export-1/take.fbx",
    "peer [2001:db8::1]:443 closed the stream; also tried 2001:db8::7 and fe80::1",
    "upstream http://tracker.internal:8080/track answered 503",
    "stage on localhost:50053 failed",
    "cannot open unix:/run/mocap/tracker.sock",
    "could not load ~/.cache/mocap-mesh/models/pose_detection.tflite",
]


@pytest.mark.parametrize("text", GRPC_TEXTS)
def test_the_sanitiser_removes_addresses_paths_and_grpc_core_text(text):
    safe = safe_message(text)
    assert not LEAKS.search(safe), safe
    assert "\n" not in safe and "\t" not in safe and len(safe) <= 301
    assert safe.count("(") == safe.count(")")


def test_the_sanitiser_keeps_what_the_stage_said():
    assert safe_message("track 1 has 3 landmarks") == "track 1 has 3 landmarks"
    assert safe_message("too few confident frames") == "too few confident frames"
    assert safe_message("the jump at 00:01:02 is too fast") == "the jump at 00:01:02 is too fast"  # clock times stay
    assert safe_message("could not decode frame 12 of /var/lib/tracker/spool/abc.mp4") == "could not decode frame 12 of <path>"
    lost = safe_message(GRPC_TEXTS[1])
    assert lost.startswith("the inference lease was lost; tracking stopped (lease leases/l-4f2a was lost: "
                           "no renewal confirmed within its 10 s TTL")
    assert "transport error" in lost
    assert safe_message("") == "no detail given"
    assert safe_message("x" * 1000) == "x" * 300


async def test_lease_client_errors_carry_no_transport_text():
    """A broker that is not there: gRPC's "ipv4:127.0.0.1:PORT: Failed to connect to remote host"
    must not become the error's message (a tracker passes it on to the gateway's clients)."""
    client = LeaseClient(f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(ServiceError) as raised:
            await client.acquire(kind="inference", holder_service="test", acquire_timeout_s=1.0)
        with pytest.raises(ServiceError) as validated:
            await client.validate("leases/l-1", 1, timeout_s=1.0)
    finally:
        await client.close()
    for error in (raised.value, validated.value):
        assert error.code == "UNAVAILABLE" and error.reason == "NOT_READY"
        assert error.message == "the lease broker could not be reached"
        assert not LEAKS.search(str(error)), str(error)


def test_retry_schedule_backs_off_exponentially_with_jitter_within_its_budget():
    now = [0.0]
    schedule = RetrySchedule(budget_s=20.0, first_delay_s=0.5, max_delay_s=4.0, max_attempts=100,
                             rng=random.Random(1), clock=lambda: now[0])
    delays = []
    attempt = 0
    while True:
        attempt += 1
        delay = schedule.next_delay(attempt)
        if delay is None:
            break
        delays.append(delay)
        now[0] += delay + 0.01  # the try itself fails at once
    bases = [0.5, 1, 2, 4, 4, 4, 4]
    for delay, base in zip(delays, bases, strict=False):
        assert 0.75 * base <= delay <= 1.25 * base or delay < base  # jittered, or the last, cut to the budget
    assert len(set(round(d / b, 6) for d, b in zip(delays[:4], bases[:4], strict=True))) > 1  # jitter varies
    assert 18.0 <= sum(delays) <= 20.0 + 0.01  # the tries span the whole budget, and no more
    assert now[0] >= 20.0 - 0.5

    capped = RetrySchedule(budget_s=1000.0, first_delay_s=0.01, max_delay_s=0.02, max_attempts=3, clock=lambda: 0.0)
    assert capped.next_delay(1) is not None and capped.next_delay(2) is not None and capped.next_delay(3) is None
    none = RetrySchedule(budget_s=0.0, first_delay_s=0.5, max_delay_s=4.0, max_attempts=20, clock=lambda: 0.0)
    assert none.next_delay(1) is None
