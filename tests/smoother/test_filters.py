"""Known answers for every classical filter: constants stay constant, lines stay lines, white noise
loses the power the filter's frequency response says it should, and variable frame rate input gives
what the equivalent constant-rate input gives.

Expected noise power ratios are derived independently of the code under test:
- Savitzky–Golay (window 2m+1, order 2 or 3): the output at the centre is the hat matrix's centre
  row, so the ratio is Σc² = H₀₀ = 3(3m² + 3m − 1) / ((2m − 1)(2m + 1)(2m + 3));
- zero-phase Butterworth of order N, cutoff ω_c: the digital (bilinear) Butterworth has
  |H|² = 1 / (1 + (tan(ω/2) / tan(ω_c/2))^(2N)); forward-backward squares it, so the ratio is
  (1/π)∫₀^π |H|⁴ dω (numerical quadrature);
- Kalman + RTS in the interior of a long track is the non-causal Wiener filter
  S_x / (S_x + r²); for the constant-velocity model sampled at dt the position spectrum is
  S_x(ω) = q dt³ (2 + cos ω) / (3 (2 − 2 cos ω)²), so the ratio is (1/π)∫₀^π (S_x / (S_x + r²))² dω;
- One-Euro with beta 0 is an exponential moving average with α = 1 / (1 + 1/(2π f_c dt)):
  ratio α / (2 − α).
Tolerance 5 %: 20 000 samples × 32 channels (fixed seed); the statistical spread of the estimate
is about 1 %.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from smoother_svc import presets
from smoother_svc.filters import Butterworth, KalmanRts, OneEuro, SavitzkyGolay, apply_filter

DT = 1.0 / 30.0
CLASSICAL = [presets.PARAMETERS[m][s] for m in (presets.ONE_EURO, presets.SAVGOL, presets.BUTTERWORTH,
                                                   presets.KALMAN_RTS) for s in presets.STRENGTHS]
CLASSICAL += [presets.MEDIAPIPE_WORLD, KalmanRts("ca", 30.0, 0.02), SavitzkyGolay(0.5, 3), Butterworth(4.0, 4)]
ZERO_PHASE = [s for s in CLASSICAL if not isinstance(s, OneEuro)]


def ids(spec: object) -> str:
    return repr(spec).replace(" ", "")


def times(n: int, dt: float = DT) -> np.ndarray:
    return np.arange(n) * dt


@pytest.mark.parametrize("spec", CLASSICAL, ids=ids)
def test_constant_stays_constant(spec):
    values = np.tile([0.31, -0.5, 1.7], (200, 1))
    out = apply_filter(spec, times(200), values)
    np.testing.assert_allclose(out, values, atol=1e-9)


@pytest.mark.parametrize("spec", ZERO_PHASE, ids=ids)
def test_line_stays_the_same_line_everywhere(spec):
    """Zero-phase filters claim lines at the edges too: SG fits a polynomial to the edge window,
    Butterworth pads by odd reflection (a line continues as itself), Kalman starts with a diffuse
    velocity prior. Interior exact to 1e-9 m; edges to 1e-6 m (Butterworth's start-up transient)."""
    t = times(300)
    line = np.stack([0.5 + 0.3 * t, -0.2 * t, 0.7 + 2.0 * t], axis=1)
    out = apply_filter(spec, t, line)
    np.testing.assert_allclose(out[30:-30], line[30:-30], atol=1e-9)
    np.testing.assert_allclose(out, line, atol=1e-6)


@pytest.mark.parametrize("spec", [s for s in CLASSICAL if isinstance(s, OneEuro)], ids=ids)
def test_one_euro_follows_a_line_with_its_known_lag(spec):
    """A causal low-pass cannot be on a ramp: in steady state the speed estimate is exactly v, so
    the cutoff is f = min_cutoff + beta·|v| and the output is the line delayed by τ = 1/(2πf)."""
    t = times(600)
    v = np.array([0.3, -0.2, 0.05])
    line = 0.5 + t[:, None] * v
    out = apply_filter(spec, t, line)
    lag = 1.0 / (2 * math.pi * (spec.min_cutoff_hz + spec.beta * np.abs(v)))
    np.testing.assert_allclose(out[-100:], line[-100:] - v * lag, atol=1e-6)
    assert np.max(np.abs(np.diff(out[-100:], 2, axis=0))) < 1e-9  # still a straight line


def _white_ratio(spec, n: int = 20_000, channels: int = 32) -> float:
    # the filters loop over time and vectorise over channels: many channels are cheap samples
    noise = np.random.default_rng(7).standard_normal((n, channels))
    out = apply_filter(spec, times(n), noise)
    return float(np.mean(out[1000:-1000] ** 2) / np.mean(noise[1000:-1000] ** 2))


@pytest.mark.parametrize("window_s", [0.2, 0.4, 0.6, 1.0])
@pytest.mark.parametrize("order", [2, 3])
def test_savgol_white_noise_power(window_s, order):
    m = int(round(window_s / DT)) // 2
    expected = 3 * (3 * m * m + 3 * m - 1) / ((2 * m - 1) * (2 * m + 1) * (2 * m + 3))
    assert _white_ratio(SavitzkyGolay(window_s, order)) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("cutoff_hz, order", [(1.0, 1), (2.0, 1), (3.5, 1), (2.0, 2), (5.0, 4)])
def test_butterworth_white_noise_power(cutoff_hz, order):
    wc = 2 * math.pi * cutoff_hz * DT
    power = lambda w: (1.0 / (1.0 + (math.tan(w / 2) / math.tan(wc / 2)) ** (2 * order))) ** 2  # noqa: E731
    expected = integrate.quad(power, 0, math.pi, limit=200)[0] / math.pi
    assert _white_ratio(Butterworth(cutoff_hz, order)) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("q, r", [(3.0, 0.02), (0.3, 0.02), (0.03, 0.02), (1.0, 0.005)])
def test_kalman_white_noise_power(q, r):
    def gain_squared(w: float) -> float:
        s_x = q * DT**3 * (2 + math.cos(w)) / (3 * (2 - 2 * math.cos(w)) ** 2)
        return (s_x / (s_x + r * r)) ** 2

    expected = integrate.quad(gain_squared, 1e-9, math.pi, limit=400)[0] / math.pi
    # noise of std r, so the filter is in the regime it is tuned for
    spec = KalmanRts("cv", q, r)
    noise = np.random.default_rng(11).standard_normal((20_000, 32)) * r
    out = apply_filter(spec, times(len(noise)), noise)
    ratio = float(np.mean(out[1000:-1000] ** 2) / np.mean(noise[1000:-1000] ** 2))
    assert ratio == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("cutoff_hz", [1.0, 1.5, 3.0])
def test_one_euro_without_beta_is_an_ema(cutoff_hz):
    alpha = 1.0 / (1.0 + 1.0 / (2 * math.pi * cutoff_hz * DT))
    assert _white_ratio(OneEuro(cutoff_hz, 0.0)) == pytest.approx(alpha / (2 - alpha), rel=0.05)


def test_one_euro_with_beta_smooths_less_than_at_its_minimum_cutoff():
    alpha = 1.0 / (1.0 + 1.0 / (2 * math.pi * 1.0 * DT))
    ratio = _white_ratio(OneEuro(1.0, 5.0))
    assert alpha / (2 - alpha) < ratio < 1.0


# --- variable frame rate --------------------------------------------------------------------


def _smooth_signal(t: np.ndarray) -> np.ndarray:
    freqs, amps, phases = np.array([0.3, 0.7, 1.3]), np.array([0.1, 0.05, 0.02]), np.array([0.4, 2.0, 5.1])
    waves = np.sum(amps * np.sin(2 * np.pi * freqs * t[:, None] + phases), axis=1)
    return np.stack([waves, 0.2 * t + 0.05 * np.cos(2 * np.pi * 0.5 * t)], axis=1)


# max |f''| of _smooth_signal (bounded by the sum of amplitude·ω²)
_MAX_CURVATURE = float(np.sum(np.array([0.1, 0.05, 0.02]) * (2 * np.pi * np.array([0.3, 0.7, 1.3])) ** 2)
                       + 0.05 * (2 * np.pi * 0.5) ** 2)


@pytest.mark.parametrize("spec", CLASSICAL, ids=ids)
def test_variable_frame_rate_equals_constant_rate(spec):
    """Frames jittered by up to ±30 % of the interval (same first and last time) against the
    constant-rate samples of the same smooth signal; the constant-rate output is interpolated at
    the jittered times.

    Tolerance, from linear interpolation's error bound dt²/8·max|f''|: resampling onto the grid and
    back makes it 2·dt²/8·max|f''| (0.7 mm here) for the grid filters (SG, Butterworth), plus 25 %
    because the grid's step is the median interval stretched to end on the last sample, so it
    differs from 1/30 s by a fraction of a percent (visible at the edges). One-Euro
    and Kalman run on the real intervals: the two inputs are different samples of one signal and
    the outputs agree to the discretisation of the filter — 3× that bound (2.5 mm, about 1 % of
    the signal's amplitude)."""
    rng = np.random.default_rng(5)
    n = 600
    constant = times(n)
    jittered = constant + rng.uniform(-0.3, 0.3, n) * DT
    jittered[0], jittered[-1] = constant[0], constant[-1]
    jittered = np.sort(jittered)
    out_cfr = apply_filter(spec, constant, _smooth_signal(constant))
    out_vfr = apply_filter(spec, jittered, _smooth_signal(jittered))
    reference = np.stack([np.interp(jittered, constant, out_cfr[:, c]) for c in range(2)], axis=1)
    bound = 2 * DT * DT / 8 * _MAX_CURVATURE
    tolerance = 1.25 * bound if isinstance(spec, (SavitzkyGolay, Butterworth)) else 3 * bound
    assert np.max(np.abs(out_vfr - reference)) <= tolerance


def test_constant_rate_input_is_filtered_without_resampling():
    """Uniform timestamps go straight to the filter: the result equals scipy's on the raw samples."""
    from scipy import signal

    t = times(90) + 12.345
    values = np.random.default_rng(1).standard_normal((90, 3))
    out = apply_filter(SavitzkyGolay(0.3, 2), t, values)
    np.testing.assert_allclose(out, signal.savgol_filter(values, 9, 2, axis=0, mode="interp"), atol=1e-12)


@pytest.mark.parametrize("spec", CLASSICAL, ids=ids)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_short_tracks_stay_finite(spec, n):
    values = np.random.default_rng(n).standard_normal((n, 3))
    out = apply_filter(spec, times(n), values)
    assert out.shape == values.shape and np.all(np.isfinite(out))
