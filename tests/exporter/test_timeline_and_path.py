"""Variable frame rate and gaps → a constant-rate timeline; the performer's path from the image."""

from __future__ import annotations

import numpy as np
import pytest

from exporter_svc.rootpath import estimate_root_path
from exporter_svc.timeline import animation_fps, resample
from mocap_common.poses import PoseTrack
from tests.exporter.conftest import CAMERA_OFFSET, cmu_global_landmarks, cmu_track


def _track(times: np.ndarray, frames: np.ndarray) -> PoseTrack:
    n = len(times)
    world = np.zeros((n, 33, 3), np.float32)
    world[:, :, 0] = times[:, None]  # x grows 1 m per second: easy to check interpolation
    image = np.ones((n, 33, 5), np.float32)
    return PoseTrack(track_id=1, frame_index=frames.astype(np.int64), timestamp_s=times, image=image,
                     world=world, bbox=np.zeros((n, 4), np.float32), score=np.ones(n, np.float32))


def test_variable_frame_rate_is_resampled_onto_the_video_grid():
    rng = np.random.default_rng(0)
    steps = rng.uniform(0.02, 0.05, 60)  # jittery VFR timestamps around 30 fps
    times = 0.5 + np.cumsum(steps)
    track = _track(times, np.arange(60))
    r = resample(track, 30.0)
    assert r.start_frame == int(np.ceil(times[0] * 30 - 1e-6))
    np.testing.assert_allclose(r.times, (r.start_frame + np.arange(r.frame_count)) / 30.0)
    assert r.times[0] >= times[0] - 1e-9 and r.times[-1] <= times[-1] + 1e-9
    np.testing.assert_allclose(r.world[:, 0, 0], r.times, atol=1e-6)  # linear in time: exact


def test_gaps_are_bridged_and_counted_as_not_observed():
    frames = np.concatenate([np.arange(0, 30), np.arange(60, 90)])  # one second missing
    track = _track(frames / 30.0, frames)
    r = resample(track, 30.0)
    assert r.frame_count == 90
    assert r.observed.sum() == 60 and not r.observed[30:60].any()
    np.testing.assert_allclose(r.world[:, 0, 0], np.arange(90) / 30.0, atol=1e-6)


def test_animation_rate_comes_from_the_video_else_from_the_timestamps():
    track = _track(np.arange(10) / 25.0, np.arange(10))
    assert animation_fps(29.97, [track]) == pytest.approx(29.97)
    assert animation_fps(0.0, [track]) == pytest.approx(25.0)
    assert animation_fps(0.0, [_track(np.array([0.0]), np.array([0]))]) == 30.0


def test_path_from_the_image_follows_the_performer():
    track = cmu_track("cmu_131_01", step=4)  # 30 fps, rendered by a 60° pinhole 4.5 m away
    root = estimate_root_path(track.image, track.world, 1920, 1080, 30.0)
    truth = 0.5 * (cmu_global_landmarks("cmu_131_01")[::4, 23] + cmu_global_landmarks("cmu_131_01")[::4, 24]) + CAMERA_OFFSET
    error = np.linalg.norm(root - truth, axis=-1)
    # Depth from apparent size is the weak part (foreshortened segments read as farther away).
    print(f"path error: mean {error.mean() * 100:.1f} cm, max {error.max() * 100:.1f} cm")
    assert error.mean() < 0.15
    travelled = np.linalg.norm(root[-1] - root[0])
    assert travelled == pytest.approx(np.linalg.norm(truth[-1] - truth[0]), rel=0.15)


def test_no_path_without_the_video_size():
    track = cmu_track("cmu_131_01", frames=10)
    assert estimate_root_path(track.image, track.world, 0, 0, 30.0) is None


def test_feet_make_an_image_path_consistent_with_standing_feet():
    # The image path with the wrong field of view (75° assumed, 60° true): depth, and so the path's
    # speed, is off by a quarter, and standing feet slide. Refined with the feet, they stand.
    from exporter_svc import feet
    from exporter_svc.solve import SolveOptions, TakeInput, solve_take

    track = cmu_track("cmu_131_01", step=4)
    landmarks = cmu_global_landmarks("cmu_131_01")[::4]
    truth_root = 0.5 * (landmarks[:, 23] + landmarks[:, 24])
    visibility = np.ones(track.world.shape[:2])
    exact = solve_take(TakeInput(world=track.world, visibility=visibility, root=truth_root),
                       SolveOptions(fps=30.0, foot_locking=False))
    truth = exact.contacts.mask
    wrong = estimate_root_path(track.image, track.world, 1920, 1080, 30.0, hfov_deg=75.0)
    skates = {}
    for refine in (False, True):
        take = solve_take(TakeInput(world=track.world, visibility=visibility, root=wrong, root_is_estimate=refine),
                          SolveOptions(fps=30.0, foot_locking=False))
        skates[refine] = feet.foot_skate(feet.contact_point_positions(take.skeleton, take.motion), truth)
    print(f"skate on true contacts: exact path {exact.unlocked_skate_m * 1000:.0f} mm, image path "
          f"{skates[False] * 1000:.0f} mm, refined {skates[True] * 1000:.0f} mm")
    # CMU's own feet move a little in contact (the exact path's figure); what the wrong path adds
    # on top of that is what the refinement must remove — measured: 1026 mm → 328 mm.
    assert skates[True] - exact.unlocked_skate_m < 0.5 * (skates[False] - exact.unlocked_skate_m)
