"""TrackManager bookkeeping with synthetic observations (no models)."""

from __future__ import annotations

import numpy as np

from mocap_common.poses import PoseTrack, PoseTrackSet, VideoInfo
from tracker_svc.roi import Rois
from mocap_common.trackio import load_track_set, save_track_set
from tracker_svc.tracking import Observation, TrackingConfig, TrackManager, association_cost


def _roi(x: float, y: float = 100.0, size: float = 80.0) -> Rois:
    return Rois(np.array([[x, y]]), np.array([size]), np.zeros(1))


def _seen(frame: int, x: float) -> Observation:
    return Observation(frame, frame / 30.0, np.zeros((33, 5), np.float32), np.zeros((33, 3), np.float32),
                       np.array([x - 20, 60, x + 20, 140], np.float32), 0.9, _roi(x))


def _batch(manager: TrackManager, frames: range, positions: dict[int, float]) -> list[PoseTrack]:
    """Every followed track whose key is in `positions` is seen in every frame of the batch."""
    observations = {t.key: [_seen(f, positions[t.key]) for f in frames] for t in manager.followed() if t.key in positions}
    return manager.commit(observations, frames[-1])


def test_association_cost_prefers_near_and_same_size() -> None:
    cost = association_cost(Rois.concatenate([_roi(0), _roi(200)]), Rois.concatenate([_roi(10), _roi(190, size=160)]))
    assert cost[0, 0] < 0.2 and cost[1, 1] > cost[1, 0] - 10  # near beats far
    assert cost[1, 1] > 0.6  # double size costs |log 2| on top of the offset


def test_tracks_are_confirmed_then_emitted_with_ids_in_order() -> None:
    manager = TrackManager(TrackingConfig(min_hits=3))
    started = manager.assign_detections(0, Rois.concatenate([_roi(100), _roi(400)]), np.array([0.6, 0.9]))
    # the higher-scoring detection is taken first
    assert [t.roi.center[0, 0] for t in started] == [400, 100]
    pieces = _batch(manager, range(0, 2), {0: 400, 1: 100})
    assert pieces == []  # 2 hits < 3: still tentative
    pieces = _batch(manager, range(2, 4), {0: 400, 1: 100})
    assert [(p.track_id, p.frame_index.tolist()) for p in pieces] == [(1, [0, 1, 2, 3]), (2, [0, 1, 2, 3])]


def test_matching_detection_does_not_start_a_second_track() -> None:
    manager = TrackManager(TrackingConfig())
    manager.assign_detections(0, _roi(100), np.array([0.9]))
    _batch(manager, range(0, 4), {0: 100})
    started = manager.assign_detections(4, Rois.concatenate([_roi(105), _roi(600)]), np.array([0.9, 0.8]))
    assert [t.roi.center[0, 0] for t in started] == [600]


def test_lost_track_is_revived_with_its_id_within_the_gap() -> None:
    manager = TrackManager(TrackingConfig(max_gap=20))
    manager.assign_detections(0, _roi(100), np.array([0.9]))
    _batch(manager, range(0, 8), {0: 100})
    _batch(manager, range(8, 16), {})  # occluded: not seen this batch
    assert manager.followed() == [] and manager.needs_detection(16)
    started = manager.assign_detections(16, _roi(130), np.array([0.9]))
    assert started[0].track_id == 1
    pieces = _batch(manager, range(16, 20), {0: 130})
    assert pieces[0].track_id == 1 and pieces[0].frame_index[0] == 16


def test_lost_track_is_forgotten_after_the_gap() -> None:
    manager = TrackManager(TrackingConfig(max_gap=10))
    manager.assign_detections(0, _roi(100), np.array([0.9]))
    _batch(manager, range(0, 8), {0: 100})
    _batch(manager, range(8, 16), {})
    _batch(manager, range(16, 24), {})
    started = manager.assign_detections(24, _roi(100), np.array([0.9]))
    pieces = _batch(manager, range(24, 28), {started[0].key: 100})
    assert pieces[0].track_id == 2  # a new person as far as ids go


def test_max_persons_caps_followed_tracks() -> None:
    manager = TrackManager(TrackingConfig(max_persons=2))
    manager.assign_detections(0, Rois.concatenate([_roi(100), _roi(300), _roi(500)]), np.array([0.7, 0.9, 0.8]))
    assert sorted(t.roi.center[0, 0] for t in manager.followed()) == [300, 500]
    assert not manager.needs_detection(100)


def test_prediction_follows_motion() -> None:
    manager = TrackManager(TrackingConfig(velocity_damping=1.0))
    manager.assign_detections(0, _roi(100), np.array([0.9]))
    observations = {0: [_seen(f, 100 + 4 * f) for f in range(8)]}
    manager.commit(observations, 7)
    predicted = manager.followed()[0].predict(10)
    assert abs(predicted.center[0, 0] - 140) < 1e-6


def test_track_set_file_round_trip(tmp_path) -> None:
    n = 3
    track = PoseTrack(7, np.arange(n), np.arange(n) / 30, np.random.rand(n, 33, 5).astype(np.float32),
                      np.random.rand(n, 33, 3).astype(np.float32), np.random.rand(n, 4).astype(np.float32),
                      np.ones(n, np.float32))
    original = PoseTrackSet(VideoInfo(640, 480, 30.0, 3, 0.1, "mp4", "h264"), [track])
    save_track_set(tmp_path / "t.npz", original)
    loaded = load_track_set(tmp_path / "t.npz")
    assert loaded.video == original.video
    np.testing.assert_array_equal(loaded.tracks[0].image, track.image)
    assert loaded.tracks[0].track_id == 7
