"""The smoother's service layer: what Smooth, SmoothStream, Train and ListCheckpoints do, with no
gRPC in sight (`server.py` decodes each request, calls this, encodes the answer, and maps the
errors raised here, `smoother_svc.errors` and the lease client's `LeaseLost`, to statuses).

Concurrency: smoothing is numpy work, so each call's tracks are smoothed in one thread of a pool
of `smooth_workers` threads; more calls wait for a thread, and the event loop keeps serving
meanwhile. Training runs in the `Trainer`'s own thread under a training lease. `close()` stops
the pool (the trainer is closed by its owner, first, so runs release their leases).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter

from mocap_common.poses import PoseTrack
from smoother_svc import presets
from smoother_svc.checkpoints import CheckpointInfo, CheckpointStore
from smoother_svc.config import SmootherConfig
from smoother_svc.gaps import typical_interval
from smoother_svc.smoothing import SmoothedTrack, SmoothingPlan, smooth_tracks
from smoother_svc.trainer import ServedModel, Trainer, TrainEvent
from smoother_svc.training import TrainingConfig

FRAMES_SMOOTHED = Counter("mocap_smoother_frames_total", "Tracked frames smoothed, by method applied.", ["method"])
FRAMES_FILLED = Counter("mocap_smoother_frames_filled_total", "Frames inserted by gap filling.")


@dataclass(frozen=True)
class TrainingDefaults:
    """What a Train call gets for each parameter it leaves unset: the service's configured
    defaults, and the model's fixed ones (window, noise scale and spread)."""

    epochs: int
    steps_per_epoch: int
    batch_size: int
    learning_rate: float
    max_seconds: float
    device: str
    window: int = 32
    noise_scale: float = 1.0
    noise_spread: float = 2.0

    @classmethod
    def from_config(cls, config: SmootherConfig) -> "TrainingDefaults":
        return cls(epochs=config.train_epochs, steps_per_epoch=config.train_steps_per_epoch,
                   batch_size=config.train_batch_size, learning_rate=config.train_learning_rate,
                   max_seconds=config.train_max_seconds, device=config.train_device)

    @staticmethod
    def new_seed() -> int:
        """A fresh seed for a run that names none (the checkpoint records it)."""
        return random.randrange(1, 2**31)


class SmootherService:
    """Smooths tracks in a thread pool, trains under a lease, lists checkpoints."""

    def __init__(self, config: SmootherConfig, store: CheckpointStore, served: ServedModel, trainer: Trainer) -> None:
        self.store = store
        self.served = served
        self.trainer = trainer
        self.training_defaults = TrainingDefaults.from_config(config)
        self._pool = ThreadPoolExecutor(max_workers=max(1, config.smooth_workers), thread_name_prefix="smooth")

    def close(self) -> None:
        """Stops the smoothing pool (calls still waiting for a thread are cancelled)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def smooth(self, tracks: list[PoseTrack], preset: str | None, method: str | None,
                     max_gap: float | None) -> tuple[SmoothingPlan, list[SmoothedTrack]]:
        """Resolves the plan (loading the served checkpoint if the learned method is asked for)
        and smooths every track, in the pool. Raises BadTracks, NoCheckpoint, presets.PresetError."""
        def work() -> tuple[SmoothingPlan, list[SmoothedTrack]]:
            plan = presets.resolve(preset, method, max_gap, self.served.get, frame_rate(tracks))
            return plan, smooth_tracks(tracks, plan)

        plan, smoothed = await asyncio.get_running_loop().run_in_executor(self._pool, work)
        filled = sum(s.metrics.frames_filled for s in smoothed)
        FRAMES_SMOOTHED.labels(plan.label.split(":")[0]).inc(sum(len(s.track) for s in smoothed) - filled)
        FRAMES_FILLED.inc(filled)
        return plan, smoothed

    def train(self, config: TrainingConfig, *, device: str, acquire_timeout_s: float | None) -> AsyncIterator[TrainEvent]:
        """One training run under a lease (see `Trainer.run`); the last event is CheckpointPublished.
        Raises LeaseLost, TrainingFailed, TrainingInterrupted, CheckpointWriteFailed and the
        lease client's ServiceErrors."""
        return self.trainer.run(config, device=device, acquire_timeout_s=acquire_timeout_s)

    async def checkpoints(self) -> list[CheckpointInfo]:
        """Every stored checkpoint, newest first."""
        return await asyncio.to_thread(self.store.list)


def frame_rate(tracks: list[PoseTrack]) -> float | None:
    """The tracks' frame rate from their typical frame interval (None for single frames)."""
    intervals = [typical_interval(t.frame_index, t.timestamp_s) for t in tracks if len(t) > 1]
    return 1.0 / float(np.median(intervals)) if intervals else None
