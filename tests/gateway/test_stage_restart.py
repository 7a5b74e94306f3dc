"""A stage's service that dies and comes back while a job needs it costs the job a retry, not its
life: the real smoother, as a child process, is SIGKILLed just before the job's Smooth stage and
started again at once (it takes its usual seconds to serve again); with the default retry budget
the job SUCCEEDS and its events say the stage was retried (which attempt, why, when again)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.config import GatewayConfig
from mocap.v1 import common_pb2, gateway_pb2
from tests.gateway.helpers import Client
from tests.gateway.leaks import LEAKS
from tests.support import REPO, ServiceProcess, free_port

pytestmark = pytest.mark.timeout(240)

DEFAULTS = GatewayConfig()  # the retry settings under test are the shipped defaults


def _smoother(tmp_path, port: int | None = None) -> ServiceProcess:
    return ServiceProcess("smoother_svc", ["--checkpoint-dir", str(REPO / "data" / "smoother" / "checkpoints"),
                                           "--resource-addr", f"127.0.0.1:{free_port()}"],
                          log_path=tmp_path / "smoother.log", port=port, ready_timeout_s=120)


@pytest.fixture
async def smoother(tmp_path):
    started: list[ServiceProcess] = []

    async def start(port: int | None = None, wait: bool = True) -> ServiceProcess:
        process = _smoother(tmp_path, port)
        started.append(process)
        await asyncio.to_thread(process.start, wait)
        return process

    yield start
    for process in started:
        await asyncio.to_thread(process.stop)


async def test_a_smoother_killed_before_smooth_and_restarted_costs_a_retry_not_the_job(
        start_gateway, stages, smoother, runner_bytes):
    first = await smoother()
    gateway = await start_gateway(smoother_addr=first.address, stage_retry_backoff_s=DEFAULTS.stage_retry_backoff_s)
    stages.tracker.knobs.gate.clear()  # the job waits inside Track until the gate opens
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.upload(runner_bytes)
        assert await asyncio.to_thread(stages.tracker.knobs.started.wait, 30)
        await asyncio.to_thread(first.kill)  # SIGKILL, as in the fault run
        killed_at = time.monotonic()
        second = await smoother(port=first.port, wait=False)  # restarted at once, like a supervisor
        stages.tracker.knobs.gate.set()  # Track ends: Smooth is next, while the smoother is still down
        done = await client.wait(job.name, timeout_s=120)
        events = await client.events(job.name)
        back_after_s = time.monotonic() - killed_at

    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, (done.error, second.log_text()[-2000:])
    retries = [e for e in events if e.type == gateway_pb2.JOB_EVENT_TYPE_STAGE_RETRY]
    assert retries and all(e.stage == common_pb2.JOB_STAGE_SMOOTH for e in retries)
    assert [e.attempt for e in retries] == list(range(1, len(retries) + 1))
    for event in retries:
        assert event.reason == "STAGE_UNAVAILABLE"
        delay = event.retry_delay.ToNanoseconds() / 1e9
        assert 0 < delay <= DEFAULTS.stage_retry_backoff_max_s * 1.25
        assert f"attempt {event.attempt} failed" in event.message and "next try in" in event.message
        assert "smoother" in event.message and not LEAKS.search(event.message), event.message
    # The retries outlasted the smoother's restart, which the old 3 tries (1.5 s) did not.
    assert back_after_s > 1.5 and len(retries) >= 2
    finished = [e for e in events if e.type == gateway_pb2.JOB_EVENT_TYPE_STAGE_FINISHED]
    assert [e.stage for e in finished] == [common_pb2.JOB_STAGE_TRACK, common_pb2.JOB_STAGE_SMOOTH,
                                           common_pb2.JOB_STAGE_EXPORT]
    assert done.quality.smoothing_method and done.quality.smoothing_method != "fake_filter"  # the real smoother did it
