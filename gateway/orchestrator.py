"""Which job runs when: a queue of QUEUED jobs, a fixed number of workers, cancellation, shutdown.

A worker takes the oldest queued job, moves it to RUNNING and runs the pipeline in a task of its
own, so CancelJob can cancel exactly that job: the task's cancellation cancels the stage call in
flight, which stops the stage. On shutdown every running job is cancelled and ends FAILED
(INTERRUPTED); queued jobs stay QUEUED in the store and are queued again at the next start.
"""

from __future__ import annotations

import asyncio

from gateway.jobs import CANCELLED, FAILED, QUEUED, RUNNING, JobError, JobRecord, interrupted
from gateway.pipeline import Pipeline
from gateway.store import JobStore
from mocap_common.logs import get_logger

log = get_logger(__name__)

CANCEL_WAIT_S = 10.0
CANCELLED_BY_CLIENT = JobError("CANCELLED", "cancelled at the client's request")


class Orchestrator:
    """Runs queued jobs with at most `max_running` at once."""

    def __init__(self, store: JobStore, max_running: int) -> None:
        self._store = store
        self._max_running = max_running
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._pipeline: Pipeline | None = None

    def cancelled_as(self, job_id: str) -> tuple[int, JobError]:
        """How a job whose task was cancelled ends (the pipeline asks)."""
        if job_id in self._cancel_requested:
            return CANCELLED, CANCELLED_BY_CLIENT
        return FAILED, interrupted()

    def start(self, pipeline: Pipeline) -> None:
        """Queues every QUEUED job of the store (oldest first) and starts the workers."""
        self._pipeline = pipeline
        for job in self._store.jobs_in_state(QUEUED):
            self._queue.put_nowait(job.job_id)
        self._workers = [asyncio.create_task(self._work(), name=f"job-worker-{i}") for i in range(self._max_running)]

    def enqueue(self, job: JobRecord) -> None:
        self._queue.put_nowait(job.job_id)

    async def _work(self) -> None:
        assert self._pipeline is not None
        while True:
            job_id = await self._queue.get()
            # Moving to RUNNING and registering the task happen in one step of the event loop, so
            # CancelJob sees the job either QUEUED in the store or here.
            job = self._store.transition(job_id, RUNNING)
            if job is None:  # cancelled or deleted while queued
                continue
            task = asyncio.create_task(self._pipeline.run(job), name=f"job-{job_id}")
            self._running[job_id] = task
            task.add_done_callback(lambda done, job_id=job_id: self._finished(job_id, done))
            # wait() neither raises the job's outcome nor cancels the job when this worker is
            # stopped; stop() deals with running jobs itself.
            await asyncio.wait({task})

    def _finished(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._cancel_requested.discard(job_id)
        if not task.cancelled() and task.exception() is not None:  # run() ends jobs itself; this is a bug
            log.error("pipeline task crashed", job=job_id, exc_info=task.exception())

    async def cancel(self, job_id: str) -> None:
        """Cancels a QUEUED or RUNNING job and waits (bounded) until it has ended."""
        if self._store.transition(job_id, CANCELLED, error=CANCELLED_BY_CLIENT, only_from=frozenset({QUEUED})) is not None:
            return  # it was still QUEUED
        task = self._running.get(job_id)
        if task is None or task.done():
            return
        self._cancel_requested.add(job_id)
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_WAIT_S)

    async def stop(self) -> None:
        """Stops the workers; every running job ends FAILED (INTERRUPTED)."""
        for worker in self._workers:
            worker.cancel()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*self._workers, *tasks, return_exceptions=True)
        self._workers.clear()
