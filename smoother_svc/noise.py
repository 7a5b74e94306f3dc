"""A parametric model of the tracker's jitter, how to sample it, and how to measure it.

Model, per landmark and axis: stationary AR(1) noise n_t = ρ·n_{t−1} + sqrt(1 − ρ²)·σ·ε_t
(σ in metres for world landmarks, in units of the person's size for image landmarks), plus
single-frame outlier spikes (probability per landmark-frame, size in σ), plus dropouts: runs of
frames where the landmark's visibility is below 0.5 and the tracker's guess is `dropout_noise`
times noisier.

Measuring (`measure_noise`) on raw tracker output, per video, over track segments of ≥ 2 s of
consecutive frames, in the band at and above 6 Hz, where a person's motion has little power (on
the CMU clips at 30 fps the clean motion's spectrum there is 3-10× below the tracker's noise):
- the power spectral density (Welch, 2 s windows, linear detrend) of every landmark axis;
- ρ (per frame, at the video's own rate): least-squares fit in log power of the AR(1) spectrum's
  shape to the band's mean normalised spectrum;
- σ per landmark and axis: the band power over the unit AR(1) model's band power;
- outliers: landmarks whose residual after a zero-phase 4 Hz Butterworth low-pass is beyond 6 σ
  (3-D length in σ units; size: their median, corrected for the part of a one-frame spike the
  low-pass keeps); dropouts: visibility < 0.5, with the dropout noise factor = the spread of Δ³x
  (in units of each landmark axis's spread) where the landmark is not visible, relative to
  everywhere.
Videos are pooled with equal weight (σ by geometric mean, rates and ρ by arithmetic mean). The tracker's noise is not
exactly AR(1) (its spectrum falls faster near Nyquist); the fit matches the band's overall slope.

Measuring takes the tracker's raw output, not videos: the smoother never imports the tracker (its
install has no tracker extra), so the tracker's own debug command writes the tracks first:

    python -m tracker_svc track VIDEO --out VIDEO.npz --threads 1      # in a tracker install
    python -m smoother_svc.noise measure VIDEO.npz... [--out smoother_svc/tracker_noise.json]
    python -m smoother_svc.noise show
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import signal

from mocap_common.poses import NUM_LANDMARKS, PoseTrackSet
from mocap_common.trackio import load_track_set
from smoother_svc.gaps import VISIBLE

DEFAULT_MODEL_PATH = Path(__file__).with_name("tracker_noise.json")
_MEASURE_CUTOFF_HZ = 4.0
_MEASURE_ORDER = 4
_MIN_SEGMENT_S = 2.0
_OUTLIER_SIGMAS = 6.0


@dataclass(frozen=True)
class NoiseModel:
    """Tracker-shaped noise. Lists are per landmark (33) and, where nested, per axis (x, y, z)."""

    world_std_m: tuple[tuple[float, float, float], ...]
    image_std_rel: tuple[tuple[float, float, float], ...]  # fraction of the object scale (landmark box (w+h)/2)
    ar1: float  # lag-1 autocorrelation of the noise, [0, 1)
    outlier_rate: float  # probability per landmark-frame of a one-frame spike
    outlier_sigmas: float  # spike size in σ of that landmark and axis
    dropout_rate: tuple[float, ...]  # fraction of frames with visibility < 0.5, per landmark
    dropout_mean_frames: float  # mean length of a dropout run, frames
    dropout_noise: float  # noise multiplier during a dropout
    fps: float = 30.0  # frame rate the figures were measured at
    provisional: bool = True
    source: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "NoiseModel":
        return cls(
            world_std_m=tuple(tuple(float(v) for v in row) for row in data["world_std_m"]),
            image_std_rel=tuple(tuple(float(v) for v in row) for row in data["image_std_rel"]),
            ar1=float(data["ar1"]),
            outlier_rate=float(data["outlier_rate"]),
            outlier_sigmas=float(data["outlier_sigmas"]),
            dropout_rate=tuple(float(v) for v in data["dropout_rate"]),
            dropout_mean_frames=float(data["dropout_mean_frames"]),
            dropout_noise=float(data["dropout_noise"]),
            fps=float(data.get("fps", 30.0)),
            provisional=bool(data.get("provisional", True)),
            source=str(data.get("source", "")),
            notes=dict(data.get("notes", {})),
        )


def load_noise_model(path: Path | None = None) -> NoiseModel:
    return NoiseModel.from_dict(json.loads((path or DEFAULT_MODEL_PATH).read_text()))


# --- sampling -------------------------------------------------------------------------------


@dataclass
class NoisySample:
    world: np.ndarray  # (T, 33, 3) metres
    image_rel: np.ndarray  # (T, 33, 3) noise in object-scale units, to be multiplied by the scale
    visibility: np.ndarray  # (T, 33) in [0, 1]


def ar1_noise(rng: np.random.Generator, shape: tuple[int, ...], rho: float) -> np.ndarray:
    """Unit-variance stationary AR(1) noise along axis 0: y_t = ρ·y_{t−1} + sqrt(1 − ρ²)·ε_t."""
    eps = rng.standard_normal(shape)
    if shape[0] < 2 or rho == 0.0:
        return eps
    innovation = math.sqrt(max(0.0, 1.0 - rho * rho))
    first = eps[:1]  # y_0 ~ N(0, 1): already stationary
    rest, _ = signal.lfilter([innovation], [1.0, -rho], eps[1:], axis=0, zi=rho * first)
    return np.concatenate([first, rest])


def dropout_mask(rng: np.random.Generator, frames: int, rate: np.ndarray, mean_frames: float) -> np.ndarray:
    """(T, J) True where a landmark drops out: a two-state Markov chain per landmark whose runs
    have geometric lengths of mean `mean_frames` and whose stationary share of dropped frames is
    `rate` (the first frame is drawn from that share)."""
    mean_frames = max(1.0, mean_frames)
    rate = np.clip(np.asarray(rate, np.float64), 0.0, 0.95)
    leave = 1.0 / mean_frames  # P(dropped → seen)
    enter = rate * leave / np.maximum(1.0 - rate, 1e-9)  # P(seen → dropped), balancing the share
    draws = rng.random((frames, len(rate)))
    mask = np.zeros((frames, len(rate)), bool)
    if frames == 0:
        return mask
    mask[0] = draws[0] < rate
    for t in range(1, frames):
        mask[t] = np.where(mask[t - 1], draws[t] >= leave, draws[t] < enter)
    return mask


def sample_noise(model: NoiseModel, frames: int, rng: np.random.Generator, scale: float = 1.0) -> NoisySample:
    """Noise for `frames` frames at the model's frame rate; `scale` multiplies every σ."""
    shape = (frames, NUM_LANDMARKS, 3)
    world_std = np.asarray(model.world_std_m) * scale
    image_std = np.asarray(model.image_std_rel) * scale
    dropped = dropout_mask(rng, frames, np.asarray(model.dropout_rate), model.dropout_mean_frames)
    boost = np.where(dropped, model.dropout_noise, 1.0)[..., None]
    world = ar1_noise(rng, shape, model.ar1) * world_std * boost
    image = ar1_noise(rng, shape, model.ar1) * image_std * boost
    spikes = rng.random((frames, NUM_LANDMARKS)) < model.outlier_rate
    if spikes.any():
        direction = rng.standard_normal((int(spikes.sum()), 3))
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
        world[spikes] += direction * world_std[np.nonzero(spikes)[1]] * model.outlier_sigmas
        image[spikes] += direction * image_std[np.nonzero(spikes)[1]] * model.outlier_sigmas
    visibility = np.where(dropped, rng.uniform(0.05, 0.45, dropped.shape), rng.uniform(0.6, 1.0, dropped.shape))
    return NoisySample(world=world, image_rel=image, visibility=visibility)


# --- measuring ------------------------------------------------------------------------------


_BAND_HZ = 6.0
# Above this the AR(1) shapes differ too little within the band to tell apart (on pure AR(1) noise
# the fit already reads 0.4 as about 0.5), so the fit stops here.
_MAX_FITTED_AR1 = 0.6


def _ar1_density(rho: float, freqs: np.ndarray, fps: float) -> np.ndarray:
    """One-sided power spectral density (per Hz) of unit-variance AR(1) noise sampled at `fps`."""
    omega = 2.0 * math.pi * freqs / fps
    return (1.0 - rho**2) / np.abs(1.0 - rho * np.exp(-1j * omega)) ** 2 * 2.0 / fps


def _band_density(segments: list[np.ndarray], fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(band frequencies, (F, 33, 3) mean PSD over segments, weighted by length) at f ≥ 6 Hz."""
    window = int(round(2.0 * fps))
    total, weight, freqs = None, 0, None
    for seg in segments:
        freqs, density = signal.welch(seg, fs=fps, nperseg=min(window, len(seg)), detrend="linear", axis=0)
        if density.shape[0] != window // 2 + 1:
            continue
        total = density * len(seg) if total is None else total + density * len(seg)
        weight += len(seg)
    if total is None or freqs is None:
        raise ValueError("no segment long enough for a spectrum")
    band = freqs >= _BAND_HZ
    return freqs[band], total[band] / weight


def fit_ar1(freqs: np.ndarray, density: np.ndarray, fps: float) -> float:
    """ρ whose AR(1) spectrum shape best fits (log least squares) the mean normalised band spectrum."""
    flat = density.reshape(len(freqs), -1)
    flat = flat[:, flat.mean(axis=0) > 0]
    shape = np.log(np.mean(flat / flat.mean(axis=0), axis=1))
    best, best_err = 0.0, math.inf
    for rho in np.arange(0.0, _MAX_FITTED_AR1 + 0.001, 0.01):
        model = np.log(_ar1_density(float(rho), freqs, fps))
        err = float(np.sum((shape - model - np.mean(shape - model)) ** 2))
        if err < best_err:
            best, best_err = float(rho), err
    return round(best, 2)


def _sigma(freqs: np.ndarray, density: np.ndarray, rho: float, fps: float) -> np.ndarray:
    """σ per channel: the band power over the unit AR(1) model's band power."""
    unit = float(np.mean(_ar1_density(rho, freqs, fps)))
    return np.sqrt(np.mean(density, axis=0) / unit)


def _segments(frame_index: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    breaks = np.flatnonzero(np.diff(frame_index) != 1) + 1
    edges = [0, *breaks.tolist(), len(frame_index)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b - a >= min_len]


@dataclass
class VideoNoise:
    """Noise figures of one video's tracks (per landmark and axis where arrays)."""

    frames: int
    world_std: np.ndarray  # (33, 3) metres
    image_std: np.ndarray  # (33, 3) object-scale units
    ar1: float
    outlier_rate: float
    outlier_sigmas: float
    dropout_rate: np.ndarray  # (33,)
    dropout_runs: list[int]
    dropout_noise: float


def measure_video(track_set: PoseTrackSet) -> VideoNoise:
    """Noise figures of one video (its own frame rate); see the module docstring."""
    fps = track_set.video.fps if track_set.video.fps > 0 else 30.0
    sos = signal.butter(_MEASURE_ORDER, _MEASURE_CUTOFF_HZ / (fps / 2), output="sos")
    min_len = int(_MIN_SEGMENT_S * fps)
    worlds, images, residuals, d3, d3_visible, visibility = [], [], [], [], [], []
    for track in track_set.tracks:
        if len(track):
            visibility.append(track.image[:, :, 3])
        for a, b in _segments(track.frame_index, min_len):
            world = track.world[a:b].astype(np.float64)
            worlds.append(world)
            images.append(track.image[a:b, :, :3].astype(np.float64) / _object_scale(track.image[a:b])[:, None, None])
            residuals.append(world - signal.sosfiltfilt(sos, world, axis=0))
            d3.append(np.diff(world, 3, axis=0))
            d3_visible.append(track.image[a + 1:b - 2, :, 3] >= VISIBLE)  # visibility at Δ³'s centre
    if not worlds:
        raise ValueError(f"no track segment of at least {_MIN_SEGMENT_S:g} s to measure")
    freqs, world_density = _band_density(worlds, fps)
    _, image_density = _band_density(images, fps)
    rho = fit_ar1(freqs, world_density, fps)
    sigma = _sigma(freqs, world_density, rho, fps)
    # A landmark's residual in its own σ, as a 3-D length; a one-frame spike keeps 1 − h₀ of its
    # size in the residual (h₀: the low-pass's centre tap), which `spike_kept` undoes.
    normalised = np.linalg.norm(np.concatenate(residuals) / np.maximum(sigma, 1e-9), axis=-1)
    outliers = normalised > _OUTLIER_SIGMAS
    spike_kept = 1.0 - _centre_tap(sos)
    # Dropout noise: Δ³ in units of its landmark axis's overall spread, where unseen vs everywhere.
    third = np.concatenate(d3)
    third = third / np.maximum(_robust_std(third), 1e-12)
    seen = np.repeat(np.concatenate(d3_visible)[..., None], 3, axis=-1)
    overall = float(_robust_std(third.reshape(-1, 1))[0])
    unseen = float(_robust_std(third[~seen].reshape(-1, 1))[0]) if (~seen).sum() > 20 else overall
    dropped = np.concatenate(visibility) < VISIBLE
    return VideoNoise(
        frames=sum(len(w) for w in worlds),
        world_std=sigma,
        image_std=_sigma(freqs, image_density, rho, fps),
        ar1=rho,
        outlier_rate=float(np.mean(outliers)),
        outlier_sigmas=float(np.median(normalised[outliers]) / spike_kept) if outliers.any() else _OUTLIER_SIGMAS,
        dropout_rate=dropped.mean(axis=0),
        dropout_runs=_runs(dropped),
        dropout_noise=float(np.clip(unseen / max(overall, 1e-12), 1.0, 10.0)),
    )


def measure_noise(track_sets: list[PoseTrackSet], source: str = "") -> NoiseModel:
    """Pools the figures of several videos, each video weighing the same: σ by geometric mean (a
    typical level between a close-up and a far-away crowd, whose noise differs several-fold),
    rates and AR(1) coefficients by arithmetic mean."""
    videos = [measure_video(ts) for ts in track_sets]
    runs = [r for v in videos for r in v.dropout_runs]
    return NoiseModel(
        world_std_m=_rows(_geometric_mean([v.world_std for v in videos])),
        image_std_rel=_rows(_geometric_mean([v.image_std for v in videos])),
        ar1=round(float(np.mean([v.ar1 for v in videos])), 4),
        outlier_rate=round(float(np.mean([v.outlier_rate for v in videos])), 6),
        outlier_sigmas=round(float(np.mean([v.outlier_sigmas for v in videos])), 3),
        dropout_rate=tuple(round(float(x), 5) for x in np.mean([v.dropout_rate for v in videos], axis=0)),
        dropout_mean_frames=round(float(np.mean(runs)), 3) if runs else 1.0,
        dropout_noise=round(float(np.mean([v.dropout_noise for v in videos])), 3),
        fps=30.0,
        provisional=False,
        source=source,
        notes={
            "method": f"spectrum at >= {_BAND_HZ:g} Hz of segments >= {_MIN_SEGMENT_S:g} s: AR(1) shape fitted "
                      "in log power, sigma from the band power; outliers on the residual after a "
                      f"{_MEASURE_CUTOFF_HZ:g} Hz zero-phase low-pass; each video weighs the same; AR(1) per frame "
                      "at each video's own rate",
            "per_video_world_std_mm_mean": ", ".join(f"{float(np.mean(v.world_std)) * 1000:.1f}" for v in videos),
            "per_video_frames": ", ".join(str(v.frames) for v in videos),
            "per_video_ar1": ", ".join(f"{v.ar1:.3f}" for v in videos),
            "regenerate": "per video: python -m tracker_svc track VIDEO --out VIDEO.npz --threads 1; then "
                          "python -m smoother_svc.noise measure VIDEO.npz...",
        },
    )


def _object_scale(image: np.ndarray) -> np.ndarray:
    xy = image[:, :, :2].astype(np.float64)
    extent = (xy.max(axis=1) - xy.min(axis=1)).mean(axis=1)
    return np.maximum(extent, 1e-6)


def _robust_std(residual: np.ndarray) -> np.ndarray:
    """1.4826 · median |r − median r| per landmark and axis: (33, 3)."""
    median = np.median(residual, axis=0)
    return 1.4826 * np.median(np.abs(residual - median), axis=0)


def _rows(values: np.ndarray) -> tuple[tuple[float, float, float], ...]:
    return tuple(tuple(round(float(v), 6) for v in row) for row in values)


def _centre_tap(sos: np.ndarray, length: int = 257) -> float:
    """The zero-phase (forward-backward) low-pass's response at lag 0 to a unit impulse."""
    impulse = np.zeros(length)
    impulse[length // 2] = 1.0
    return float(signal.sosfiltfilt(sos, impulse)[length // 2])


def _geometric_mean(values: list[np.ndarray]) -> np.ndarray:
    return np.exp(np.mean([np.log(np.maximum(v, 1e-12)) for v in values], axis=0))


def _runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in each column of a (T, J) mask."""
    lengths: list[int] = []
    for j in range(mask.shape[1]):
        padded = np.concatenate([[False], mask[:, j], [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        lengths.extend((edges[1::2] - edges[0::2]).tolist())
    return lengths


# --- command line ---------------------------------------------------------------------------


def read_tracks(paths: list[Path]) -> list[PoseTrackSet]:
    """Raw tracker output, one .npz per video (mocap_common.trackio: what `python -m tracker_svc
    track` and `mocap track` write), unsmoothed."""
    return [load_track_set(path) for path in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smoother_svc.noise", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    measure = sub.add_parser("measure", help="measure the tracker's noise in its raw tracks (.npz from "
                                             "`python -m tracker_svc track VIDEO --out FILE.npz`)")
    measure.add_argument("tracks", nargs="+", type=Path, help="one .npz of raw tracks per video")
    measure.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    sub.add_parser("show", help="print the shipped noise model")
    args = parser.parse_args(argv)
    if args.command == "show":
        print(load_noise_model().to_json())
        return 0
    sets = read_tracks(args.tracks)
    for path, track_set in zip(args.tracks, sets):
        print(f"{path.name}: {len(track_set.tracks)} track(s), {track_set.video.frame_count} frames "
              f"@ {track_set.video.fps:g} fps", file=sys.stderr)
    model = measure_noise(sets, source="measured on tracker_svc's raw output for " + ", ".join(p.stem for p in args.tracks))
    args.out.write_text(model.to_json() + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
