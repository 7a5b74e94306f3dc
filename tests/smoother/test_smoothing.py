"""Whole tracks: gap filling, long gaps, visibility weighting, what is kept, and the metrics."""

from __future__ import annotations

import numpy as np
import pytest

from smoother_svc import presets
from smoother_svc.errors import BadTracks
from smoother_svc.filters import Butterworth, KalmanRts, SavitzkyGolay
from smoother_svc.smoothing import SmoothingPlan, smooth_track, smooth_tracks
from tests.smoother.helpers import make_track, moving_world

DT = 1.0 / 30.0
FILTERS = [presets.PARAMETERS[m][presets.STANDARD] for m in
           (presets.ONE_EURO, presets.SAVGOL, presets.BUTTERWORTH, presets.KALMAN_RTS)]


def plan(spec, max_gap_s: float = 0.25) -> SmoothingPlan:
    return SmoothingPlan(label="test", world=spec, image=spec, max_gap_s=max_gap_s)


def noisy(track, seed: int = 0, std: float = 0.02):
    rng = np.random.default_rng(seed)
    track.world += rng.normal(0, std, track.world.shape).astype(np.float32)
    track.image[:, :, :2] += rng.normal(0, std * 500, track.image[:, :, :2].shape).astype(np.float32)
    return track


def split_frames(first: range, second: range):
    frames = np.array([*first, *second])
    t = frames * DT
    return frames, make_track(t, frame_index=frames, world=moving_world(t))


@pytest.mark.parametrize("spec", FILTERS, ids=lambda s: s.name)
def test_gap_longer_than_the_limit_stays_a_gap(spec):
    """30 missing frames (1 s) with a 0.25 s limit: nothing is inserted, and each side is smoothed
    exactly as if the other did not exist — no filter reaches across the gap."""
    frames, track = split_frames(range(0, 60), range(90, 150))
    track = noisy(track)
    out = smooth_track(track, plan(spec)).track
    np.testing.assert_array_equal(out.frame_index, frames)
    first, second = (make_track(track.timestamp_s[s], frame_index=frames[s], world=track.world[s],
                                image_xyz=track.image[s, :, :3]) for s in (slice(0, 60), slice(60, 120)))
    alone = [smooth_track(part, plan(spec)).track for part in (first, second)]
    np.testing.assert_array_equal(out.world[:60], alone[0].world)
    np.testing.assert_array_equal(out.world[60:], alone[1].world)
    np.testing.assert_array_equal(out.image[60:], alone[1].image)


def test_short_gap_is_filled_by_interpolation_and_marked():
    """3 missing frames (0.1 s): frames 30-32 are inserted; with no filtering their landmarks are
    the straight line between frames 29 and 33, their visibility, presence and score are 0, and the
    tracked frames are untouched."""
    frames, track = split_frames(range(0, 30), range(33, 60))
    result = smooth_track(track, plan(None))
    out = result.track
    np.testing.assert_array_equal(out.frame_index, np.arange(60))
    np.testing.assert_allclose(out.timestamp_s, np.arange(60) * DT, atol=1e-12)
    expected = moving_world(np.arange(60) * DT)  # the motion is linear, so interpolation is exact
    np.testing.assert_allclose(out.world[30:33], expected[30:33], atol=1e-6)
    tracked = np.isin(out.frame_index, frames)
    np.testing.assert_array_equal(out.world[tracked], track.world)
    np.testing.assert_array_equal(out.image[tracked], track.image)
    assert np.all(out.image[30:33, :, 3:] == 0) and np.all(out.score[30:33] == 0)
    assert result.metrics.frames_filled == 3


@pytest.mark.parametrize("missing, filled", [(7, True), (8, False)])
def test_gap_limit_is_inclusive_at_the_frame(missing, filled):
    """At 30 fps, 0.25 s is 7.5 frames: a 7-frame gap is filled, an 8-frame gap is not."""
    _, track = split_frames(range(0, 20), range(20 + missing, 40 + missing))
    out = smooth_track(track, plan(Butterworth(2.0, 1))).track
    assert len(out) == (40 + missing if filled else 40)


def test_negative_limit_never_fills():
    _, track = split_frames(range(0, 20), range(22, 40))
    result = smooth_track(track, plan(Butterworth(2.0, 1), max_gap_s=-1.0))
    assert len(result.track) == 38 and result.metrics.frames_filled == 0


def test_a_pause_in_time_splits_the_track_even_without_missing_frames():
    """Consecutive frame indices but a 1 s jump in time (a stalled variable-rate stream)."""
    t = np.concatenate([np.arange(40) * DT, 2.0 + np.arange(40) * DT])
    track = noisy(make_track(t, world=moving_world(t)))
    out = smooth_track(track, plan(KalmanRts("cv", 0.3, 0.02))).track
    first = make_track(t[:40], world=track.world[:40], image_xyz=track.image[:40, :, :3])
    np.testing.assert_array_equal(out.world[:40], smooth_track(first, plan(KalmanRts("cv", 0.3, 0.02))).track.world)


@pytest.mark.parametrize("spec", FILTERS[1:], ids=lambda s: s.name)
def test_short_low_visibility_run_is_interpolated_over(spec):
    """A landmark reported 1 m off for 4 frames with visibility 0.1: the zero-phase filters ignore
    those samples (interpolated / unmeasured), so the output stays on the true line."""
    t = np.arange(90) * DT
    world = moving_world(t)
    track = make_track(t, world=world)
    track.world[40:44, 15] += 1.0
    track.image[40:44, 15, 3] = 0.1
    out = smooth_track(track, plan(spec)).track
    assert np.max(np.abs(out.world[20:70, 15] - world[20:70, 15])) < 1e-3


def test_long_low_visibility_run_keeps_the_trackers_guess():
    """Visibility 0.1 for 2 s (longer than the gap limit): the tracker's own positions are kept and
    smoothed — no straight line is invented across them."""
    t = np.arange(150) * DT
    world = moving_world(t)
    guess = world.copy()
    guess[30:90, 15, 1] += 0.3 * np.sin(np.linspace(0, np.pi, 60))  # an arc the tracker saw
    track = make_track(t, world=guess)
    track.image[30:90, 15, 3] = 0.1
    out = smooth_track(track, plan(Butterworth(2.0, 1))).track
    assert np.max(np.abs(out.world[45:75, 15, 1] - guess[45:75, 15, 1])) < 0.01
    assert np.max(np.abs(out.world[45:75, 15, 1] - world[45:75, 15, 1])) > 0.2


def test_visibility_presence_boxes_and_scores_are_kept():
    t = np.arange(60) * DT
    track = noisy(make_track(t, visibility=np.random.default_rng(3).uniform(0, 1, (60, 33))))
    out = smooth_track(track, plan(presets.PARAMETERS[presets.KALMAN_RTS][presets.STANDARD])).track
    np.testing.assert_array_equal(out.image[:, :, 3:], track.image[:, :, 3:])
    np.testing.assert_array_equal(out.bbox, track.bbox)
    np.testing.assert_array_equal(out.score, track.score)


@pytest.mark.parametrize("spec", FILTERS, ids=lambda s: s.name)
def test_image_and_world_landmarks_are_both_smoothed(spec):
    t = np.arange(120) * DT
    clean = make_track(t, world=moving_world(t))
    track = noisy(make_track(t, world=moving_world(t)))
    out = smooth_track(track, plan(spec)).track
    for name, sl in (("world", np.s_[:, :, :]), ("image", np.s_[:, :, :2])):
        before = np.abs(np.diff(getattr(track, name)[sl], 2, axis=0)).mean()
        after = np.abs(np.diff(getattr(out, name)[sl], 2, axis=0)).mean()
        assert after < 0.5 * before, name
    assert np.abs(out.world[20:-20] - clean.world[20:-20]).mean() < np.abs(track.world - clean.world).mean()


# --- metrics --------------------------------------------------------------------------------


def test_metrics_have_known_values():
    """x = a·t²: every second difference is 2a·dt² (also at uneven timestamps, where the scaled
    divided difference of a quadratic is exact): jitter = 2|a|·dt²·1000 mm/frame² (to float32
    rounding of the positions)."""
    a = 3.0
    rng = np.random.default_rng(2)
    t = np.sort(np.arange(50) * DT + rng.uniform(-0.2, 0.2, 50) * DT)
    world = np.zeros((50, 33, 3))
    world[:, :, 0] = a * t[:, None] ** 2
    visibility = np.ones((50, 33))
    visibility[:25, 7] = 0.2  # landmark 7 seen in half the frames
    track = make_track(t, world=world, visibility=visibility)
    result = smooth_track(track, plan(None))
    frame_dt = float(np.median(np.diff(t)))
    m = result.metrics
    assert m.jitter_before_mm == pytest.approx(2 * a * frame_dt**2 * 1000, rel=1e-3)
    assert m.jitter_after_mm == pytest.approx(m.jitter_before_mm)
    assert m.mean_displacement_mm == 0.0 and m.frames_filled == 0
    assert m.joint_coverage[7] == pytest.approx(0.5) and m.joint_coverage[0] == 1.0


def test_jitter_counts_only_consecutive_frames():
    """A gap breaks the runs: frames 0-2 and 10-12 give two centres, the jump between is not
    acceleration."""
    frames = np.array([0, 1, 2, 10, 11, 12])
    world = np.zeros((6, 33, 3))
    world[3:, :, 0] = 5.0  # a jump across the gap
    track = make_track(frames * DT, frame_index=frames, world=world)
    assert smooth_track(track, plan(None, max_gap_s=-1)).metrics.jitter_before_mm == 0.0


def test_displacement_is_the_mean_move_in_mm():
    t = np.arange(40) * DT
    track = make_track(t)
    out = smooth_track(track, plan(SavitzkyGolay(0.3, 2))).track
    assert np.allclose(out.world, track.world, atol=1e-6)  # a still pose does not move
    assert smooth_track(track, plan(SavitzkyGolay(0.3, 2))).metrics.mean_displacement_mm < 1e-3


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_tracks(n):
    track = make_track(np.arange(n) * DT)
    result = smooth_track(track, plan(presets.PARAMETERS[presets.KALMAN_RTS][presets.STANDARD]))
    assert len(result.track) == n
    assert result.metrics.jitter_before_mm == 0.0 and len(result.metrics.joint_coverage) == 33


# --- input checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("corrupt, field", [
    (lambda t: t.world.__setitem__((3, 5, 1), np.nan), "tracks[0].frames[3].world_landmarks"),
    (lambda t: t.image.__setitem__((4, 2, 0), np.inf), "tracks[0].frames[4].image_landmarks"),
    (lambda t: t.world.__setitem__((1, 0, 0), 1e6), "tracks[0].frames[1].world_landmarks"),
    (lambda t: t.timestamp_s.__setitem__(5, t.timestamp_s[4]), "tracks[0].frames"),
])
def test_malformed_tracks_are_named(corrupt, field):
    track = make_track(np.arange(10) * DT)
    corrupt(track)
    with pytest.raises(BadTracks) as caught:
        smooth_tracks([track], plan(None))
    assert caught.value.field == field
