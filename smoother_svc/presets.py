"""Strength presets → method and parameters, as chosen by `bench/bench_smoother.py --tune`.

Every method has parameters for each strength; a preset names the method used when the request
does not override it. The strengths are tuned for noise levels — light for takes half as noisy as
the tracker noise model (`tracker_noise.json`), standard for that model, strong for takes twice as
noisy — with one objective, the project's goal: the lowest MPJPE among parameters that cut the
acceleration error by ≥ 70 % (if none does: the largest cut whose MPJPE is no worse than the
input's). Tuned on cmu_131_01/02, checked on the held-out cmu_131_03. The preset's method is the
method with the lowest MPJPE by that rule; the learned smoother has one strength (its checkpoint)
and competes for `standard` only — and wins it (held-out cmu_131_03: MPJPE well below the classical
methods' at about the same acceleration error), so STANDARD is LEARNED, falling back to the
strength's classical choice where no checkpoint exists or the video is far from 30 fps. The figures
are in the smoother's report and in bench/results/smoother-*.json.

Image landmarks use the same method's parameters (they are filtered in about-metres units), except
with the learned method, whose checkpoint only knows world landmarks: images then use the
strength's classical choice, which also takes segments shorter than the network's window.
"""

from __future__ import annotations

from collections.abc import Callable

from smoother_svc.errors import NoCheckpoint
from smoother_svc.filters import Butterworth, FilterSpec, KalmanRts, OneEuro, SavitzkyGolay
from smoother_svc.smoothing import SmoothingPlan
from smoother_svc.smoothnet import LearnedSmoother

OFF, LIGHT, STANDARD, STRONG = "off", "light", "standard", "strong"
STRENGTHS = (LIGHT, STANDARD, STRONG)

NONE, ONE_EURO, ONE_EURO_MEDIAPIPE, SAVGOL, BUTTERWORTH, KALMAN_RTS, LEARNED = (
    "none", "one_euro", "one_euro_mediapipe", "savgol", "butterworth", "kalman_rts", "learned")
METHODS = (NONE, ONE_EURO, ONE_EURO_MEDIAPIPE, SAVGOL, BUTTERWORTH, KALMAN_RTS, LEARNED)

DEFAULT_MAX_GAP_S = 0.25
MAX_GAP_LIMIT_S = 2.0

# MediaPipe's own One-Euro settings (pose landmark graph): world landmarks unscaled, image
# landmarks with the speed divided by the person's size.
MEDIAPIPE_WORLD = OneEuro(min_cutoff_hz=0.1, beta=40.0, d_cutoff_hz=1.0)
MEDIAPIPE_IMAGE = OneEuro(min_cutoff_hz=0.05, beta=80.0, d_cutoff_hz=1.0, scale_speed=True)

# Tuned parameters per method and strength (`python -m bench.bench_smoother --tune`, 2026-11-22,
# noise model measured on runner_1080p + street_720p; bench/results/smoother-*-tune.json).
PARAMETERS: dict[str, dict[str, FilterSpec]] = {
    ONE_EURO: {
        LIGHT: OneEuro(min_cutoff_hz=1.0, beta=5.0),
        STANDARD: OneEuro(min_cutoff_hz=2.0, beta=1.0),
        STRONG: OneEuro(min_cutoff_hz=1.0, beta=0.0),
    },
    SAVGOL: {
        LIGHT: SavitzkyGolay(window_s=0.4, order=2),
        STANDARD: SavitzkyGolay(window_s=0.6, order=2),
        STRONG: SavitzkyGolay(window_s=1.2, order=2),
    },
    BUTTERWORTH: {
        LIGHT: Butterworth(cutoff_hz=3.5, order=1),
        STANDARD: Butterworth(cutoff_hz=2.0, order=1),
        STRONG: Butterworth(cutoff_hz=1.0, order=1),
    },
    KALMAN_RTS: {
        LIGHT: KalmanRts(model="cv", process_noise=10.0, measurement_std=0.05),
        STANDARD: KalmanRts(model="cv", process_noise=0.3, measurement_std=0.02),
        STRONG: KalmanRts(model="cv", process_noise=0.03, measurement_std=0.02),
    },
}

# The classical method with the lowest MPJPE per strength (tuning clips). Butterworth and
# Kalman/RTS come within about 2 % of each other at every strength (Kalman has the lower
# acceleration error): either would do, and re-measured noise can swap them.
CLASSICAL_CHOICE: dict[str, str] = {LIGHT: BUTTERWORTH, STANDARD: BUTTERWORTH, STRONG: BUTTERWORTH}
PRESET_METHOD: dict[str, str] = {LIGHT: BUTTERWORTH, STANDARD: LEARNED, STRONG: BUTTERWORTH}
# A preset whose method is LEARNED uses its classical choice instead when no checkpoint exists or
# the video is far from the 30 fps the network was trained at (the response's `method` says which
# ran); the learned method also filters image landmarks (and segments shorter than its window)
# with it.
LEARNED_FPS = 30.0
LEARNED_FPS_TOLERANCE = 0.2  # the preset uses the learned method between 24 and 36 fps


def classical(preset: str) -> FilterSpec:
    return PARAMETERS[CLASSICAL_CHOICE[preset]][preset]


class PresetError(ValueError):
    """A preset/method combination that makes no sense (e.g. an explicit method with OFF)."""


def resolve(preset: str | None, method: str | None, max_gap_s: float | None,
            learned: Callable[[], LearnedSmoother | None], fps: float | None = None) -> SmoothingPlan:
    """The plan for a request.

    `preset` OFF/LIGHT/STANDARD/STRONG (None → STANDARD); `method` None = the preset's;
    `max_gap_s` None = default, < 0 = never fill; `learned()` returns the served checkpoint or
    None; `fps` the tracks' frame rate. An explicitly requested learned method without a
    checkpoint raises NoCheckpoint; a preset's learned method falls back to its classical choice.
    """
    preset = preset or STANDARD
    if preset == OFF:
        if method not in (None, NONE):
            raise PresetError("preset OFF filters nothing; leave method unset or use another preset")
        return SmoothingPlan(label=NONE, world=None, image=None, max_gap_s=-1.0)
    gap = DEFAULT_MAX_GAP_S if max_gap_s is None else max_gap_s
    chosen = method or PRESET_METHOD[preset]
    if chosen == LEARNED:
        model = learned()
        if model is None and method == LEARNED:
            raise NoCheckpoint("no learned smoother checkpoint exists yet; train one with Train")
        if model is not None and (method == LEARNED or _near_training_rate(fps)):
            fallback = classical(preset)
            return SmoothingPlan(label=f"learned:{model.version}", world=fallback, image=fallback, max_gap_s=gap,
                                 learned=model)
        chosen = CLASSICAL_CHOICE[preset]
    if chosen == NONE:
        return SmoothingPlan(label=NONE, world=None, image=None, max_gap_s=gap)
    if chosen == ONE_EURO_MEDIAPIPE:
        return SmoothingPlan(label=ONE_EURO_MEDIAPIPE, world=MEDIAPIPE_WORLD, image=MEDIAPIPE_IMAGE, max_gap_s=gap)
    spec = PARAMETERS[chosen][preset]
    return SmoothingPlan(label=chosen, world=spec, image=spec, max_gap_s=gap)


def _near_training_rate(fps: float | None) -> bool:
    return fps is None or abs(fps - LEARNED_FPS) <= LEARNED_FPS_TOLERANCE * LEARNED_FPS
