"""Training runs under a TRAINING lease from resource_svc, and the model the service serves.

    Trainer.run(config, device, job)  → async iterator of TrainEvent
      1. acquire a training lease (waiting up to the caller's deadline / the configured limit);
      2. train in a worker thread (torch), progress events flowing back to the caller;
      3. check the lease is still ours (fencing) and publish the checkpoint as the next version;
      4. release the lease — on success, failure, cancellation and lease loss alike.

The lease is held by a task of its own (the lease client cancels the task that holds it when the
lease is lost), and that task never leaves the lease before the training thread has stopped: on
cancellation it sets the thread's stop flag and waits for it, so no training step ever runs
outside the lease.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import Counter, Gauge

from mocap_common.background import EventRuns, run_stoppable_thread
from mocap_common.lease_client import LeaseLost, lease
from mocap_common.lease_metrics import LeaseRunOutcome
from mocap_common.logs import get_logger
from mocap_common.procs import finish_uncancellable
from smoother_svc.checkpoints import CheckpointInfo, CheckpointStore
from smoother_svc.errors import CheckpointWriteFailed, TrainingInterrupted
from smoother_svc.noise import NoiseModel
from smoother_svc.smoothnet import LearnedSmoother
from smoother_svc.training import Progress, TrainedModel, TrainingConfig, TrainingData, train

log = get_logger(__name__)

TRAINING_RUNS = Counter("mocap_smoother_training_runs_total", "Training runs by outcome.", ["outcome"])
TRAINING_ACTIVE = Gauge("mocap_smoother_training_active", "Training runs holding a lease now.")


@dataclass(frozen=True)
class LeaseGranted:
    lease: str  # "leases/{id}"
    device: str


@dataclass(frozen=True)
class TrainProgressEvent:
    progress: Progress
    lease: str


@dataclass(frozen=True)
class CheckpointPublished:
    checkpoint: CheckpointInfo
    lease: str


TrainEvent = LeaseGranted | TrainProgressEvent | CheckpointPublished


class ServedModel:
    """The newest checkpoint, loaded once per version (thread-safe)."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._loaded: LearnedSmoother | None = None

    def get(self) -> LearnedSmoother | None:
        newest = self.store.newest()
        with self._lock:
            if newest is None:
                return self._loaded
            if self._loaded is None or self._loaded.version != newest.version:
                self._loaded = self.store.load(newest)
                log.info("serving learned smoother", version=newest.version, window=newest.window)
            return self._loaded


@dataclass(frozen=True)
class TrainerSettings:
    resource_addr: str
    mocap_dir: Path
    lease_ttl_s: float
    acquire_timeout_s: float


class Trainer:
    def __init__(self, settings: TrainerSettings, store: CheckpointStore, served: ServedModel, noise: NoiseModel) -> None:
        self.settings = settings
        self.store = store
        self.served = served
        self.noise = noise
        self._data: TrainingData | None = None
        self._data_lock = threading.Lock()
        self._runs: EventRuns[TrainEvent] = EventRuns(
            lambda: TrainingInterrupted("training was stopped: the smoother is shutting down"))

    async def run(self, config: TrainingConfig, *, device: str, job: str = "",
                  acquire_timeout_s: float | None = None) -> AsyncIterator[TrainEvent]:
        """Trains under a lease, yielding events; the last one is CheckpointPublished.

        Raises the lease client's errors (DeadlineExceeded NO_SLOT, Unavailable, ...), LeaseLost,
        TrainingFailed, CheckpointWriteFailed. Closing the iterator (the caller went away)
        cancels the run and releases the lease.
        """
        timeout = self.settings.acquire_timeout_s if acquire_timeout_s is None else min(acquire_timeout_s, self.settings.acquire_timeout_s)
        async for event in self._runs.stream(lambda emit: self._session(config, device, job, timeout, emit),
                                             "training session"):
            yield event

    async def close(self) -> None:
        """Cancels every run (service shutdown); each releases its lease."""
        await self._runs.close()

    async def _session(self, config: TrainingConfig, device: str, job: str, acquire_timeout_s: float,
                       emit: Callable[[TrainEvent], None]) -> None:
        with LeaseRunOutcome(TRAINING_RUNS, log, "training finished") as run:
            async with lease(self.settings.resource_addr, kind="training", holder_service="smoother", job=job,
                             device=device, ttl_s=self.settings.lease_ttl_s,
                             acquire_timeout_s=acquire_timeout_s) as held:
                with TRAINING_ACTIVE.track_inprogress():
                    log.info("training lease held", lease=held.name, device=held.device, config=config)
                    emit(LeaseGranted(held.name, held.device))
                    trained = await self._train_in_thread(config, held.torch_device(), held.name, emit)
                    if not await held.validate():
                        raise LeaseLost(held.name, "ValidateLease says the fencing token is no longer current")
                    # Once writing starts it finishes: a checkpoint is published whole or not at all.
                    publishing = asyncio.ensure_future(asyncio.to_thread(self._publish, trained))
                    await finish_uncancellable(publishing)
                    info = publishing.result()
                    await asyncio.to_thread(self.served.get)  # load it now, so the next Smooth does not wait
                    emit(CheckpointPublished(info, held.name))
                    run.succeeded()

    async def _train_in_thread(self, config: TrainingConfig, device: str, lease_name: str,
                               emit: Callable[[TrainEvent], None]) -> TrainedModel:
        loop = asyncio.get_running_loop()

        def report(progress: Progress) -> None:
            loop.call_soon_threadsafe(emit, TrainProgressEvent(progress, lease_name))

        def work(stop: threading.Event) -> TrainedModel:
            return train(config, self._training_data(), device=device, on_progress=report, should_stop=stop.is_set)

        # Cancelled (caller gone, lease lost, shutdown): the thread stops before the lease goes.
        return await run_stoppable_thread(work)

    def _training_data(self) -> TrainingData:
        with self._data_lock:
            if self._data is None:
                self._data = TrainingData.load(self.settings.mocap_dir, self.noise)
            return self._data

    def _publish(self, trained: TrainedModel) -> CheckpointInfo:
        try:
            info = self.store.save(trained)
        except OSError as error:
            log.error("checkpoint write failed", error=str(error))
            raise CheckpointWriteFailed("the trained model could not be stored") from error
        log.info("checkpoint published", version=info.version, val_accel_error_mm=info.val_accel_error_mm,
                 val_mpjpe_mm=info.val_mpjpe_mm)
        return info


def torch_threads(count: int) -> None:
    """Intra-op threads for every torch call of this process (1 keeps a loaded 2-core host responsive:
    OpenMP's spinning threads slow down by 10× when the cores are shared)."""
    torch.set_num_threads(max(1, count))
