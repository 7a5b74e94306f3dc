"""Classical temporal filters over timestamped samples.

Every filter takes `times` (T,) strictly increasing seconds and `values` (T, C) — one column per
coordinate channel — and returns filtered values of the same shape, float64. They see one
*segment* of a track (no long gaps: `gaps.py` splits tracks first), with every sample present
(missing ones were interpolated by the caller), except the Kalman smoother, which takes per-sample
weights and skips samples of weight 0.

Variable frame rate:
- One-Euro and Kalman/RTS use the real interval between samples.
- Savitzky–Golay and Butterworth are defined on a uniform grid: the samples are linearly
  resampled to a grid at (about) the segment's median interval spanning exactly its first to last
  sample, filtered, and sampled back at the original times (`on_uniform_grid`). Constant-rate input (every interval within 0.1 % of the
  median) skips the resampling, so it is filtered exactly.

    FilterSpec
    ├── OneEuro          causal adaptive low-pass (Casiez et al. 2012; MediaPipe's variant)
    ├── SavitzkyGolay    local polynomial least squares (scipy.signal.savgol_filter, mode "interp")
    ├── Butterworth      zero-phase low-pass (scipy.signal.sosfiltfilt, odd padding)
    └── KalmanRts        constant-velocity / constant-acceleration Kalman filter + RTS smoother
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import signal

# Sampling is "uniform" when every interval is within this fraction of the median.
_UNIFORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class OneEuro:
    """One-Euro filter: cutoff = min_cutoff + beta·|speed|, speed low-passed at d_cutoff.

    `scale_speed` divides the speed by the per-frame object scale passed to `one_euro`
    (MediaPipe's value scaling for image landmarks); world landmarks use the speed as is.
    """

    min_cutoff_hz: float
    beta: float
    d_cutoff_hz: float = 1.0
    scale_speed: bool = False

    name = "one_euro"


@dataclass(frozen=True)
class SavitzkyGolay:
    """Savitzky–Golay: a polynomial of `order` fitted over `window_s` seconds around each sample."""

    window_s: float
    order: int = 2

    name = "savgol"


@dataclass(frozen=True)
class Butterworth:
    """Butterworth low-pass of `order`, run forward and backward (zero phase, magnitude |H|²)."""

    cutoff_hz: float
    order: int = 2

    name = "butterworth"


@dataclass(frozen=True)
class KalmanRts:
    """Kalman filter with Rauch–Tung–Striebel smoothing, per channel.

    model "cv": state (position, velocity), white acceleration of spectral density
    `process_noise` (m²/s³); model "ca": state (position, velocity, acceleration), white jerk
    (m²/s⁵). Measurements have standard deviation `measurement_std` (m) at weight 1 and
    `measurement_std / sqrt(weight)` at lower weights.
    """

    model: str
    process_noise: float
    measurement_std: float

    name = "kalman_rts"


FilterSpec = OneEuro | SavitzkyGolay | Butterworth | KalmanRts


# --- sampling -------------------------------------------------------------------------------


def median_interval(times: np.ndarray) -> float:
    """The median sample interval in seconds (1/30 s when there are fewer than two samples)."""
    if len(times) < 2:
        return 1.0 / 30.0
    return float(np.median(np.diff(times)))


def is_uniform(times: np.ndarray) -> bool:
    if len(times) < 3:
        return True
    steps = np.diff(times)
    dt = float(np.median(steps))
    return bool(np.all(np.abs(steps - dt) <= _UNIFORM_TOLERANCE * dt))


def uniform_grid(times: np.ndarray) -> np.ndarray:
    """A uniform grid from the first to the last time whose step is the median interval, stretched
    by less than half a step over the whole span so that both ends are samples (nothing is
    extrapolated)."""
    dt = median_interval(times)
    count = max(2, int(round((times[-1] - times[0]) / dt)) + 1)
    return np.linspace(times[0], times[-1], count)


def interpolate(times: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Linear interpolation of (T, C) `values` at times `at`; holds the end values outside."""
    out = np.empty((len(at), values.shape[1]))
    for c in range(values.shape[1]):
        out[:, c] = np.interp(at, times, values[:, c])
    return out


def on_uniform_grid(times: np.ndarray, values: np.ndarray,
                    filt: Callable[[np.ndarray, float], np.ndarray]) -> np.ndarray:
    """Runs `filt(uniform values, dt)` on a uniform resampling of the samples, then samples back."""
    if is_uniform(times):
        return filt(values, median_interval(times))
    grid = uniform_grid(times)
    return interpolate(grid, filt(interpolate(times, values, grid), float(grid[1] - grid[0])), times)


# --- the filters ----------------------------------------------------------------------------


def apply_filter(spec: FilterSpec, times: np.ndarray, values: np.ndarray,
                 weights: np.ndarray | None = None, object_scale: np.ndarray | None = None) -> np.ndarray:
    """Filters (T, C) `values` sampled at `times` with `spec`.

    `weights` (T, C) in [0, 1] only matter to the Kalman smoother (0 = no measurement);
    `object_scale` (T,) only to One-Euro with `scale_speed`.
    """
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return values.copy()
    if isinstance(spec, OneEuro):
        return one_euro(times, values, spec, object_scale if spec.scale_speed else None)
    if isinstance(spec, SavitzkyGolay):
        return on_uniform_grid(times, values, lambda v, dt: savgol(v, dt, spec))
    if isinstance(spec, Butterworth):
        return on_uniform_grid(times, values, lambda v, dt: butterworth(v, dt, spec))
    if isinstance(spec, KalmanRts):
        w = np.ones_like(values) if weights is None else weights
        return kalman_rts(times, values, w, spec)
    raise TypeError(f"not a filter spec: {spec!r}")


def one_euro(times: np.ndarray, values: np.ndarray, spec: OneEuro,
             object_scale: np.ndarray | None = None) -> np.ndarray:
    """MediaPipe's One-Euro filter, vectorised over channels, with the real interval per sample.

    As in MediaPipe: the speed is the raw difference to the previous raw sample, times the value
    scale (1 / object scale when given), times the frequency; it is low-passed at `d_cutoff_hz`.
    """
    out = np.empty_like(values)
    out[0] = values[0]
    speed = np.zeros(values.shape[1])
    for i in range(1, len(values)):
        dt = times[i] - times[i - 1]
        scale = 1.0 / object_scale[i] if object_scale is not None else 1.0
        raw_speed = (values[i] - values[i - 1]) * scale / dt
        speed = speed + _alpha(spec.d_cutoff_hz, dt) * (raw_speed - speed)
        cutoff = spec.min_cutoff_hz + spec.beta * np.abs(speed)
        out[i] = out[i - 1] + _alpha(cutoff, dt) * (values[i] - out[i - 1])
    return out


def _alpha(cutoff_hz: float | np.ndarray, dt: float) -> float | np.ndarray:
    tau = 1.0 / (2.0 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt)


def savgol_frames(spec: SavitzkyGolay, dt: float, length: int) -> tuple[int, int]:
    """(window, order) in samples for a segment of `length` samples: the window is odd, at most
    the segment, and longer than the order (the order drops for very short segments)."""
    window = max(1, int(round(spec.window_s / dt)))
    window = min(window | 1, length if length % 2 else length - 1)
    order = min(spec.order, window - 1)
    return window, order


def savgol(values: np.ndarray, dt: float, spec: SavitzkyGolay) -> np.ndarray:
    window, order = savgol_frames(spec, dt, len(values))
    if window < 3 or order < 0:
        return values.copy()
    # "interp" fits the polynomial to the first/last whole window at the edges: lines stay lines.
    return signal.savgol_filter(values, window, order, axis=0, mode="interp")


def butterworth_sos(spec: Butterworth, dt: float) -> np.ndarray | None:
    """Second-order sections of the low-pass, or None when the cutoff is at or above Nyquist."""
    normalised = spec.cutoff_hz * 2.0 * dt  # fraction of the Nyquist frequency
    if not 0.0 < normalised < 1.0:
        return None
    return signal.butter(spec.order, normalised, btype="low", output="sos")


def butterworth_padlen(spec: Butterworth, dt: float, length: int) -> int:
    """Odd-extension padding: long enough for the filter's start-up transient (six periods
    of the cutoff) to die out before the data, at most the segment length − 1."""
    sections = math.ceil(spec.order / 2)
    default = 3 * (2 * sections + 1)
    transient = int(math.ceil(6.0 / (spec.cutoff_hz * dt)))
    return min(length - 1, max(default, transient))


def butterworth(values: np.ndarray, dt: float, spec: Butterworth) -> np.ndarray:
    sos = butterworth_sos(spec, dt)
    if sos is None or len(values) < 2:
        return values.copy()
    padlen = butterworth_padlen(spec, dt, len(values))
    return signal.sosfiltfilt(sos, values, axis=0, padtype="odd", padlen=padlen)


# --- Kalman / RTS ---------------------------------------------------------------------------

# Prior on the first state: nearly unknown (so a straight line is followed exactly from its first
# samples); the state starts at the first measurement only to keep the numbers small.
_PRIOR_POSITION_STD = 100.0  # m
_PRIOR_VELOCITY_STD = 1000.0  # m/s
_PRIOR_ACCEL_STD = 10000.0  # m/s²
_MIN_WEIGHT = 1e-6


def transition(model: str, dt: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Discrete (F, Q) of the continuous white-noise model over an interval dt."""
    if model == "cv":
        f = np.array([[1.0, dt], [0.0, 1.0]])
        qm = q * np.array([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]])
    elif model == "ca":
        f = np.array([[1.0, dt, dt**2 / 2], [0.0, 1.0, dt], [0.0, 0.0, 1.0]])
        qm = q * np.array([
            [dt**5 / 20, dt**4 / 8, dt**3 / 6],
            [dt**4 / 8, dt**3 / 3, dt**2 / 2],
            [dt**3 / 6, dt**2 / 2, dt],
        ])
    else:
        raise ValueError(f"unknown Kalman model {model!r} (cv or ca)")
    return f, qm


def kalman_rts(times: np.ndarray, values: np.ndarray, weights: np.ndarray, spec: KalmanRts) -> np.ndarray:
    """Kalman filter forward, RTS smoother backward, every channel at once.

    Channels with equal weight columns share one covariance, so the caller may pass (T, C) with
    C = many; the covariance work is done per distinct weight column.
    """
    n_t, n_c = values.shape
    columns, group_of = np.unique(np.asarray(weights, np.float64), axis=1, return_inverse=True)
    group_of = np.asarray(group_of).reshape(-1)
    n_g = columns.shape[1]
    dim = 2 if spec.model == "cv" else 3
    r = spec.measurement_std**2
    observed = columns > 0.0
    noise = r / np.maximum(columns, _MIN_WEIGHT)  # (T, G)

    # State per channel, covariance per group.
    x = np.zeros((n_c, dim))
    p = np.zeros((n_g, dim, dim))
    first = _first_observation(values, observed[:, group_of])
    x[:, 0] = first
    # Diffuse: the first measurement's update sets the position (a prior of r² there would count
    # that measurement twice and bend a straight line at the start).
    prior = np.diag([_PRIOR_POSITION_STD**2, _PRIOR_VELOCITY_STD**2, _PRIOR_ACCEL_STD**2][:dim])
    p[:] = prior
    xs_filt = np.empty((n_t, n_c, dim))
    ps_filt = np.empty((n_t, n_g, dim, dim))
    transitions: list[tuple[np.ndarray, np.ndarray]] = []
    cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(n_t):
        if i > 0:
            dt = float(times[i] - times[i - 1])
            if dt not in cache:
                cache[dt] = transition(spec.model, dt, spec.process_noise)
            f, qm = cache[dt]
            transitions.append((f, qm))
            x = x @ f.T
            p = f @ p @ f.T + qm
        x, p = _update(x, p, values[i], observed[i], noise[i], group_of)
        xs_filt[i] = x
        ps_filt[i] = p

    # RTS backward pass: x_s[i] = x_f[i] + G (x_s[i+1] − F x_f[i]), G = P_f[i] Fᵀ P_pred[i+1]⁻¹.
    smoothed = np.empty((n_t, n_c))
    x_s = xs_filt[-1]
    smoothed[-1] = x_s[:, 0]
    for i in range(n_t - 2, -1, -1):
        f, qm = transitions[i]
        p_pred = f @ ps_filt[i] @ f.T + qm
        gain = ps_filt[i] @ f.T @ _inverse(p_pred)  # G = P_f Fᵀ P_pred⁻¹
        x_pred = xs_filt[i] @ f.T
        x_s = xs_filt[i] + np.einsum("cij,cj->ci", gain[group_of], x_s - x_pred)
        smoothed[i] = x_s[:, 0]
    return smoothed


def _inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a batch of 2×2 or 3×3 matrices by the adjugate (np.linalg is slow on tiny batches)."""
    if m.shape[-1] == 2:
        a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
        adj = np.stack([np.stack([d, -b], -1), np.stack([-c, a], -1)], -2)
        return adj / (a * d - b * c)[:, None, None]
    cof = np.empty_like(m)
    for i in range(3):
        for j in range(3):
            r = [k for k in range(3) if k != i]
            c = [k for k in range(3) if k != j]
            minor = m[:, r[0], c[0]] * m[:, r[1], c[1]] - m[:, r[0], c[1]] * m[:, r[1], c[0]]
            cof[:, i, j] = (-1) ** (i + j) * minor
    det = np.einsum("ij,ij->i", m[:, 0, :], cof[:, 0, :])
    return cof.transpose(0, 2, 1) / det[:, None, None]


def _first_observation(values: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Per channel, the first observed value (the first value when none is observed)."""
    index = np.argmax(observed, axis=0)
    return values[index, np.arange(values.shape[1])]


def _update(x: np.ndarray, p: np.ndarray, measurement: np.ndarray, observed: np.ndarray,
            noise: np.ndarray, group_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Measurement update of position, only for groups with an observation at this sample."""
    if not observed.any():
        return x, p
    s = p[:, 0, 0] + noise  # (G,)
    gain = p[:, :, 0] / s[:, None]  # (G, dim)
    gain = np.where(observed[:, None], gain, 0.0)
    innovation = measurement - x[:, 0]
    x = x + gain[group_of] * innovation[:, None]
    p = p - gain[:, :, None] * p[:, None, 0, :]
    return x, p
