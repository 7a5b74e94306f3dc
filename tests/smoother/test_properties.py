"""Property test: no NaN or inf leaves the smoother, for any valid track and every method.

Random tracks: 0-40 frames, frame jumps (occlusions) short and long, uneven timestamps, landmarks
anywhere in range, visibility random with some landmarks — or all — invisible throughout.
Every preset and method, the learned one included (an untrained SmoothNet with an 8-frame window:
what is checked is the plumbing around the network, not its quality).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mocap_common.poses import PoseTrack
from smoother_svc import presets
from smoother_svc.smoothing import smooth_tracks
from smoother_svc.smoothnet import LearnedSmoother, SmoothNet
from tests.smoother.helpers import make_track

torch.manual_seed(0)
_LEARNED = LearnedSmoother(model=SmoothNet(window=8).eval(), version="v0")
PLANS = [presets.resolve(p, None, None, lambda: _LEARNED, 30.0) for p in (presets.OFF, *presets.STRENGTHS)]
PLANS += [presets.resolve(presets.STANDARD, m, g, lambda: _LEARNED, 30.0)
          for m in presets.METHODS for g in (None, -1.0, 2.0)]


@st.composite
def tracks(draw) -> PoseTrack:
    n = draw(st.integers(0, 40))
    steps = draw(st.lists(st.sampled_from([1, 1, 1, 2, 4, 9, 30]), min_size=n, max_size=n))
    frames = np.cumsum([0, *steps[1:]]) if n else np.zeros(0, np.int64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dt = draw(st.sampled_from([1 / 24, 1 / 30, 1 / 60]))
    jitter = draw(st.floats(0.0, 0.45))
    times = np.cumsum(np.diff(frames, prepend=0) * dt * (1 + rng.uniform(-jitter, jitter, n))) if n else np.zeros(0)
    times = times + draw(st.floats(0.0, 1000.0))
    scale = draw(st.sampled_from([1e-6, 0.01, 1.0, 50.0]))
    world = rng.uniform(-scale, scale, (n, 33, 3))
    image = rng.uniform(-100.0, 4000.0, (n, 33, 3)) * draw(st.sampled_from([0.0, 1.0]))
    visibility = rng.uniform(0, 1, (n, 33))
    hidden = draw(st.sampled_from(["none", "some", "all"]))
    if hidden == "some":
        visibility[:, rng.choice(33, 5, replace=False)] = 0.0
    elif hidden == "all":
        visibility[:] = 0.0
    return make_track(times, frame_index=frames, world=world, image_xyz=image, visibility=visibility)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(track=tracks(), plan_index=st.integers(0, len(PLANS) - 1))
def test_nothing_non_finite_escapes(track, plan_index):
    plan = PLANS[plan_index]
    [result] = smooth_tracks([track], plan)
    out = result.track
    for name in ("image", "world", "bbox", "score", "timestamp_s"):
        assert np.all(np.isfinite(getattr(out, name))), (plan.label, name)
    m = result.metrics
    assert all(math.isfinite(v) for v in (m.jitter_before_mm, m.jitter_after_mm, m.mean_displacement_mm))
    assert all(0.0 <= c <= 1.0 for c in m.joint_coverage)
    # structure: the tracked frames are all there, in order, with their visibility; inserted ones are new
    assert np.all(np.diff(out.frame_index) > 0) and np.all(np.diff(out.timestamp_s) > 0)
    tracked = np.isin(out.frame_index, track.frame_index)
    np.testing.assert_array_equal(out.frame_index[tracked], track.frame_index)
    np.testing.assert_array_equal(out.image[tracked][:, :, 3:], track.image[:, :, 3:])
    assert m.frames_filled == len(out) - len(track)
    if plan.max_gap_s < 0:
        assert m.frames_filled == 0
