"""Training the learned smoother on clean motion with tracker-shaped noise (no gRPC, no lease:
`trainer.py` wraps this in a training lease and a thread).

Data: the training clips (cmu_131_01, cmu_131_02) at 30 fps, each at the four phases of its
120 fps source (four distinct 30 fps sequences per clip), world landmarks hip-centred, every
landmark axis one channel. Each epoch draws fresh noise from the noise model, treats short
dropouts as the service does (`gaps.sample_weights` + `interpolate_missing`), and samples random
windows. Loss: L1 of positions + L1 of second differences (SmoothNet's position and acceleration
losses), in decimetres.

Validation: cmu_131_03 with fixed noise (seed 1234, the same for every run), smoothed through the
service's own path (`smoothing.smooth_track`): acceleration error and MPJPE in mm. It is reported
only; no model is selected by it, so the benchmark's figures on that clip stay unbiased.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mocap_common.poses import PoseTrack
from smoother_svc import metrics
from smoother_svc.errors import TrainingFailed
from smoother_svc.filters import Butterworth
from smoother_svc.gaps import interpolate_missing, sample_weights
from smoother_svc.noise import NoiseModel, sample_noise
from smoother_svc.reference_data import HELD_OUT_CLIPS, TRAIN_CLIPS, ReferenceClip, load_clip, noisy_track
from smoother_svc.smoothing import SmoothingPlan, smooth_track
from smoother_svc.smoothnet import INPUT_SCALE, LearnedSmoother, SmoothNet, smooth_windows

VALIDATION_SEED = 1234
PHASES = 4  # 120 fps sources → four 30 fps sequences each
DEFAULT_MAX_GAP_S = 0.25


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of one run (already validated and defaulted)."""

    epochs: int = 8
    steps_per_epoch: int = 128
    window: int = 32
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 1
    noise_scale: float = 1.0
    max_seconds: float = 900.0
    accel_loss_weight: float = 1.0
    # Each training sequence's noise is scaled by a factor drawn log-uniformly from
    # [1/noise_spread, noise_spread] (× noise_scale), so the model sees calmer and noisier takes.
    noise_spread: float = 2.0


@dataclass(frozen=True)
class Progress:
    epoch: int  # from 1; 0 before the first step
    epochs: int
    step: int
    loss: float
    val_accel_error_mm: float
    val_mpjpe_mm: float


@dataclass
class TrainedModel:
    state_dict: dict[str, torch.Tensor]
    window: int
    epochs_completed: int
    steps: int
    val_accel_error_mm: float
    val_mpjpe_mm: float
    val_accel_error_input_mm: float
    val_mpjpe_input_mm: float
    config: TrainingConfig
    noise_source: str
    training_clips: tuple[str, ...] = TRAIN_CLIPS
    validation_clip: str = HELD_OUT_CLIPS[0]
    stopped_early: bool = False
    notes: dict[str, str] = field(default_factory=dict)


class TrainingStopped(Exception):
    """The caller asked the loop to stop (cancellation or lease loss)."""


@dataclass
class TrainingData:
    """Clean training sequences (channels × frames) and the fixed validation track."""

    sequences: list[np.ndarray]  # each (T, 33, 3) world metres
    validation: ReferenceClip
    validation_track: PoseTrack
    noise: NoiseModel

    @classmethod
    def load(cls, mocap_dir: Path, noise: NoiseModel) -> "TrainingData":
        sequences = [load_clip(mocap_dir, name, phase=p).world for name in TRAIN_CLIPS for p in range(PHASES)]
        validation = load_clip(mocap_dir, HELD_OUT_CLIPS[0])
        track = noisy_track(validation, noise, np.random.default_rng(VALIDATION_SEED))
        return cls(sequences=sequences, validation=validation, validation_track=track, noise=noise)


def noisy_inputs(clean: np.ndarray, noise: NoiseModel, rng: np.random.Generator, scale: float) -> np.ndarray:
    """(T, 33, 3) clean → what the network sees in service: noise, short dropouts interpolated."""
    sample = sample_noise(noise, len(clean), rng, scale)
    noisy = clean + sample.world
    times = np.arange(len(clean)) / 30.0
    weights = sample_weights(sample.visibility, np.zeros(len(clean), bool), times, DEFAULT_MAX_GAP_S)
    flat = interpolate_missing(times, noisy.reshape(len(clean), -1), np.repeat(weights, 3, axis=1))
    return flat.reshape(clean.shape)


def _epoch_batches(data: TrainingData, config: TrainingConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, T_max) noisy and clean channel series for one epoch, padded; plus lengths via NaN."""
    series_noisy, series_clean = [], []
    for clean in data.sequences:
        spread = math.log(max(config.noise_spread, 1.0))
        scale = config.noise_scale * math.exp(rng.uniform(-spread, spread))
        noisy = noisy_inputs(clean, data.noise, rng, scale)
        series_noisy.extend(noisy.reshape(len(clean), -1).T)
        series_clean.extend(clean.reshape(len(clean), -1).T)
    longest = max(len(s) for s in series_clean)
    noisy_arr = np.full((len(series_clean), longest), np.nan, np.float32)
    clean_arr = np.full_like(noisy_arr, np.nan)
    for i, (a, b) in enumerate(zip(series_noisy, series_clean)):
        noisy_arr[i, :len(a)] = a
        clean_arr[i, :len(b)] = b
    return torch.from_numpy(noisy_arr), torch.from_numpy(clean_arr)


def _sample_windows(noisy: torch.Tensor, clean: torch.Tensor, lengths: np.ndarray, window: int, batch: int,
                    rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    rows = rng.integers(0, len(lengths), batch)
    starts = (rng.random(batch) * (lengths[rows] - window + 1)).astype(np.int64)
    index = torch.from_numpy(starts[:, None] + np.arange(window)[None, :]).to(noisy.device)
    row_index = torch.from_numpy(rows)[:, None].to(noisy.device)
    return noisy[row_index, index], clean[row_index, index]


def loss_fn(predicted: torch.Tensor, target: torch.Tensor, accel_weight: float) -> torch.Tensor:
    position = (predicted - target).abs().mean()
    accel = (torch.diff(predicted, n=2, dim=-1) - torch.diff(target, n=2, dim=-1)).abs().mean()
    return position + accel_weight * accel


def validate(model: SmoothNet, data: TrainingData, fallback: Butterworth) -> tuple[float, float]:
    """(accel error mm/frame², MPJPE mm) on the validation clip through the service's path."""
    learned = LearnedSmoother(model=model, version="training")
    plan = SmoothingPlan(label="learned", world=fallback, image=None, max_gap_s=DEFAULT_MAX_GAP_S, learned=learned)
    out = smooth_track(data.validation_track, plan).track.world
    truth = data.validation.world
    return metrics.accel_error_mm(out, truth), metrics.mpjpe_mm(out, truth)


def train(config: TrainingConfig, data: TrainingData, *, device: str = "cpu",
          on_progress: Callable[[Progress], None] = lambda p: None,
          should_stop: Callable[[], bool] = lambda: False) -> TrainedModel:
    """Trains a SmoothNet; raises TrainingStopped when `should_stop()` turns true, TrainingFailed
    when the loss stops being finite. Stops early (keeping the model as it stands) after
    `config.max_seconds`."""
    started = time.monotonic()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = SmoothNet(window=config.window).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    shortest = min(len(s) for s in data.sequences)
    if shortest < config.window:
        raise TrainingFailed(f"window {config.window} is longer than the shortest training sequence ({shortest} frames)")
    fallback = Butterworth(cutoff_hz=3.0, order=2)
    input_accel = metrics.accel_error_mm(data.validation_track.world, data.validation.world)
    input_mpjpe = metrics.mpjpe_mm(data.validation_track.world, data.validation.world)
    val_accel, val_mpjpe = validate(model.eval(), data, fallback)
    on_progress(Progress(0, config.epochs, 0, 0.0, val_accel, val_mpjpe))

    step, epochs_done, stopped_early = 0, 0, False
    for epoch in range(1, config.epochs + 1):
        noisy, clean = _epoch_batches(data, config, rng)
        lengths = (~torch.isnan(clean)).sum(dim=1).numpy()
        noisy, clean = torch.nan_to_num(noisy).to(device), torch.nan_to_num(clean).to(device)
        model.train()
        losses = []
        for _ in range(config.steps_per_epoch):
            if should_stop():
                raise TrainingStopped()
            x, y = _sample_windows(noisy, clean, lengths, config.window, config.batch_size, rng)
            predicted = smooth_windows(model, x, INPUT_SCALE)
            loss = loss_fn(predicted * INPUT_SCALE, y * INPUT_SCALE, config.accel_loss_weight)  # decimetres
            if not torch.isfinite(loss):
                raise TrainingFailed(f"the loss became non-finite at step {step + 1}; lower learning_rate")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            step += 1
            if time.monotonic() - started > config.max_seconds:
                stopped_early = True
                break
        epochs_done = epoch if len(losses) == config.steps_per_epoch else epoch - 1
        val_accel, val_mpjpe = validate(model.eval(), data, fallback)
        on_progress(Progress(epoch, config.epochs, step, float(np.mean(losses)) if losses else math.nan,
                             val_accel, val_mpjpe))
        if stopped_early:
            break
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return TrainedModel(
        state_dict=state, window=config.window, epochs_completed=epochs_done, steps=step,
        val_accel_error_mm=val_accel, val_mpjpe_mm=val_mpjpe,
        val_accel_error_input_mm=input_accel, val_mpjpe_input_mm=input_mpjpe,
        config=config, noise_source=data.noise.source, stopped_early=stopped_early,
    )
