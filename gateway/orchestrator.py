"""Which job runs where and when: claims on the shared store, a fixed number of workers,
heartbeats, cancellation, shutdown.

Durable execution. Every gateway replica (one, or several sharing a PostgreSQL store) runs
`max_running` workers. A free worker *claims* a job in the store — a RUNNING job whose claim
lapsed first (its replica died: the job is taken over), else the oldest QUEUED one — with a fresh
token and a lease of `job_claim_ttl_s`, and runs the pipeline in a task of its own. A heartbeat
renews the leases of this replica's jobs every third of the TTL; a job whose renewal fails was
cancelled, ended or taken over elsewhere, and its task is stopped at once (the store refuses its
writes anyway: every write names the claim's token).

    replica killed -9 ──▶ its claims lapse after the TTL ──▶ another replica's worker claims the
    job (RESUMED event) ──▶ the pipeline resumes after the last stage recorded as done

Shutdown hands jobs back instead of failing them: their claims are released, so another replica
(or this gateway after its restart) resumes them at once. A job claimed `max_job_claims` times
(its replicas keep dying with it) ends FAILED rather than taking another replica down.

CancelJob ends a job of this replica by cancelling its task (the stage call in flight is
cancelled with it, which stops the stage); a job running on another replica is moved to
CANCELLED in the store, and its replica stops it at its next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass

from prometheus_client import Gauge

from gateway.jobs import ACTIVE_STATES, CANCELLED, FAILED, QUEUED, RUNNING, JobError, JobRecord, now_us
from gateway.pipeline import CANCELLED_BY_CLIENT, Outcome, Pipeline
from gateway.store import JobStore
from mocap_common.logs import get_logger

log = get_logger(__name__)

CANCEL_WAIT_S = 10.0
RUNNING_JOBS = Gauge("mocap_gateway_running_jobs", "Jobs this gateway replica is executing now.")


@dataclass
class _Execution:
    task: asyncio.Task[None]
    token: str


@dataclass(frozen=True)
class ClaimPolicy:
    owner: str  # this replica's name
    ttl_s: float  # a claim lapses this long after its last renewal
    poll_s: float  # how often an idle worker looks for work
    max_claims: int  # a job claimed this often ends FAILED instead

    @property
    def heartbeat_s(self) -> float:
        return self.ttl_s / 3


class Orchestrator:
    """Claims and runs jobs with at most `max_running` at once on this replica."""

    def __init__(self, store: JobStore, max_running: int, policy: ClaimPolicy) -> None:
        self._store = store
        self._max_running = max_running
        self._policy = policy
        self._wake = asyncio.Event()
        self._running: dict[str, _Execution] = {}
        self._cancel_requested: set[str] = set()
        self._lost: set[str] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._pipeline: Pipeline | None = None

    def outcome(self, job_id: str) -> Outcome:
        """How a job whose task was cancelled ends (the pipeline asks)."""
        if job_id in self._lost:
            return Outcome.LOST
        if job_id in self._cancel_requested:
            return Outcome.CANCELLED
        return Outcome.HAND_BACK

    def start(self, pipeline: Pipeline) -> None:
        """Starts the workers and the heartbeat."""
        self._pipeline = pipeline
        self._workers = [asyncio.create_task(self._work(), name=f"job-worker-{i}") for i in range(self._max_running)]
        self._workers.append(asyncio.create_task(self._heartbeat(), name="job-heartbeat"))

    def enqueue(self, job: JobRecord) -> None:
        """A job was created here: wake the workers rather than wait for their next poll."""
        self._wake.set()

    # Workers -----------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            try:
                job = await self._claim()
            except Exception:  # noqa: BLE001 - the store is unreachable: try again at the next poll
                log.exception("claiming a job failed")
                job = None
            if job is None:
                await self._idle()
                continue
            await self._execute(job)

    async def _idle(self) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._policy.poll_s)

    async def _claim(self) -> JobRecord | None:
        token = secrets.token_hex(12)
        expire_us = now_us() + int(self._policy.ttl_s * 1_000_000)
        while (job := await self._store.claim_job(self._policy.owner, token, expire_us)) is not None:
            if job.claims <= self._policy.max_claims:
                if job.claims > 1:
                    log.info("job taken over", job=job.job_id, claims=job.claims, resumes_after=job.completed_stage)
                return job
            error = JobError("INTERRUPTED", f"the gateway running this job stopped {job.claims - 1} times while it ran; "
                                            "it is not tried again: submit it again", job.stage)
            await self._store.transition(job.job_id, FAILED, error=error, claim_token=token)
            log.warning("job failed after repeated takeovers", job=job.job_id, claims=job.claims)
        return None

    async def _execute(self, job: JobRecord) -> None:
        assert self._pipeline is not None
        task = asyncio.create_task(self._pipeline.run(job), name=f"job-{job.job_id}")
        self._running[job.job_id] = _Execution(task, job.claim_token)
        RUNNING_JOBS.set(len(self._running))
        task.add_done_callback(lambda done, job_id=job.job_id: self._finished(job_id, done))
        # wait() neither raises the job's outcome nor cancels the job when this worker is
        # stopped; stop() deals with running jobs itself.
        await asyncio.wait({task})

    def _finished(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        RUNNING_JOBS.set(len(self._running))
        self._cancel_requested.discard(job_id)
        self._lost.discard(job_id)
        if not task.cancelled() and task.exception() is not None:  # run() ends jobs itself; this is a bug
            log.error("pipeline task crashed", job=job_id, exc_info=task.exception())

    # Heartbeat ---------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._policy.heartbeat_s)
            try:
                await self.renew()
            except Exception:  # noqa: BLE001 - the store is unreachable; the next beat tries again
                log.exception("renewing job claims failed")

    async def renew(self) -> None:
        """Extends this replica's claims; stops the jobs whose claim is gone."""
        tokens = {job_id: run.token for job_id, run in self._running.items()}
        if not tokens:
            return
        held = await self._store.renew_claims(self._policy.owner, tokens,
                                              now_us() + int(self._policy.ttl_s * 1_000_000))
        for job_id in tokens.keys() - held:
            run = self._running.get(job_id)
            if run is not None and run.token == tokens[job_id] and not run.task.done():
                log.warning("job claim lost; stopping it here", job=job_id)
                self._lost.add(job_id)
                run.task.cancel()

    # Cancel and stop ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> None:
        """Cancels a QUEUED or RUNNING job; a job of this replica is waited for (bounded)."""
        run = self._running.get(job_id)
        if run is None or run.task.done():
            # QUEUED, or RUNNING on another replica (which stops it at its next heartbeat).
            await self._store.transition(job_id, CANCELLED, error=CANCELLED_BY_CLIENT, only_from=ACTIVE_STATES)
            return
        self._cancel_requested.add(job_id)
        run.task.cancel()
        await asyncio.wait({run.task}, timeout=CANCEL_WAIT_S)

    async def stop(self) -> None:
        """Stops the workers; running jobs are handed back (claims released) for resumption."""
        for worker in self._workers:
            worker.cancel()
        tasks = [run.task for run in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*self._workers, *tasks, return_exceptions=True)
        self._workers.clear()


__all__ = ["CANCELLED_BY_CLIENT", "ClaimPolicy", "Orchestrator", "Outcome", "QUEUED", "RUNNING"]
