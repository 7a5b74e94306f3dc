"""End-to-end tracking on the test clips: coverage, timestamps, stable ids, streaming, cancellation."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import av
import numpy as np
import pytest

from mocap_common.poses import PoseTrack, PoseTrackSet
from tracker_svc.detector import box_iou
from tracker_svc.errors import TrackingCancelled
from tracker_svc.model_setup import ModelPaths
from tracker_svc.pipeline import Finished, PoseTracker, Progress, TrackChunk, VideoOpened
from tracker_svc.tracking import pose_distance
from tracker_svc.video import ByteFeed

SAME_PERSON_IOU = 0.5  # consecutive-frame boxes overlapping more than this are one person
DUPLICATE_POSE = 0.05  # two tracks closer than this (mean landmark distance / pose size) = one person


@pytest.fixture(scope="module")
def tracker(models: ModelPaths) -> PoseTracker:
    return PoseTracker(models, device="cpu")


@pytest.fixture(scope="module")
def runner_events(tracker: PoseTracker, runner_path: Path) -> list:
    return list(tracker.track(runner_path))


@pytest.fixture(scope="module")
def street_tracks(tracker: PoseTracker, street_path: Path) -> PoseTrackSet:
    return tracker.track_to_set(street_path)


def _join(events: list) -> PoseTrackSet:
    pieces: dict[int, list[PoseTrack]] = defaultdict(list)
    for event in events:
        if isinstance(event, TrackChunk):
            pieces[event.track.track_id].append(event.track)
    finished = events[-1]
    assert isinstance(finished, Finished)
    return PoseTrackSet(finished.video, [PoseTrack.concatenate(pieces[i]) for i in sorted(pieces)])


def _stream_pts(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return np.array([f.pts * float(stream.time_base) for f in container.decode(stream)])


def test_runner_is_one_track_covering_the_clip(runner_events: list, runner_path: Path) -> None:
    tracks = _join(runner_events)
    assert len(tracks.tracks) == 1
    track = tracks.tracks[0]
    assert len(track) >= 175
    assert np.all(np.diff(track.frame_index) > 0)
    assert np.all(np.diff(track.timestamp_s) > 0)
    np.testing.assert_allclose(track.timestamp_s, _stream_pts(runner_path)[track.frame_index], atol=1e-9)
    assert tracks.video.frame_count == 180
    # landmarks are inside the frame and look like a standing person (head above the ankles)
    assert np.all(track.score >= 0.5)
    assert np.median(track.image[:, 0, 1]) < np.median(track.image[:, 27, 1])
    assert np.all(np.abs(track.world[:, :, :]) < 2.0)  # metres around the hips


def test_event_order_and_progress(runner_events: list) -> None:
    assert isinstance(runner_events[0], VideoOpened)
    assert isinstance(runner_events[-1], Finished)
    progress = [e for e in runner_events if isinstance(e, Progress)]
    done = [p.frames_done for p in progress]
    assert done == sorted(done) and done[-1] == 180
    assert all(p.frames_total == 180 and p.fps > 0 for p in progress)
    finished = runner_events[-1]
    assert finished.stats.frames == 180 and finished.stats.tracks == 1


def test_street_has_simultaneous_stable_tracks(street_tracks: PoseTrackSet) -> None:
    per_frame: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = defaultdict(list)
    for track in street_tracks.tracks:
        for row, frame in enumerate(track.frame_index):
            per_frame[int(frame)].append((track.track_id, track.bbox[row], track.image[row]))
    assert max(len(v) for v in per_frame.values()) >= 3

    # Identity: in consecutive frames, a box that overlaps a box of the previous frame by IoU > 0.5
    # (the same person, moved a little) carries the same id as the best-overlapping one.
    switches, continuations = 0, 0
    for frame in sorted(per_frame):
        previous = per_frame.get(frame - 1)
        if not previous:
            continue
        prev_boxes = np.array([b for _, b, _ in previous])
        for track_id, box, _ in per_frame[frame]:
            iou = box_iou(box, prev_boxes)
            best = int(np.argmax(iou))
            if iou[best] > SAME_PERSON_IOU:
                continuations += 1
                switches += previous[best][0] != track_id
    assert continuations > 300
    assert switches == 0

    # No two tracks on the same person in a frame.
    for poses in per_frame.values():
        for i in range(len(poses)):
            for j in range(i + 1, len(poses)):
                assert pose_distance(poses[i][2], poses[j][2]) > DUPLICATE_POSE


def test_streamed_bytes_give_the_same_tracks(tracker: PoseTracker, street_path: Path, street_tracks: PoseTrackSet) -> None:
    feed = ByteFeed()
    data = street_path.read_bytes()

    def produce() -> None:
        for offset in range(0, len(data), 32 << 10):
            feed.feed(data[offset:offset + (32 << 10)])
        feed.finish()

    threading.Thread(target=produce, daemon=True).start()
    streamed = tracker.track_to_set(feed)
    assert [t.track_id for t in streamed.tracks] == [t.track_id for t in street_tracks.tracks]
    for ours, theirs in zip(streamed.tracks, street_tracks.tracks):
        np.testing.assert_array_equal(ours.frame_index, theirs.frame_index)
        np.testing.assert_allclose(ours.image, theirs.image, atol=1e-3)


def test_cancel_stops_within_two_seconds(tracker: PoseTracker, runner_path: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    feed = ByteFeed()
    data = runner_path.read_bytes()
    feed.feed(data)
    feed.finish()
    seen = []
    started_at: list[float] = []
    with pytest.raises(TrackingCancelled):
        for event in tracker.track(feed, cancel=cancel, spool_dir=tmp_path):
            seen.append(event)
            if isinstance(event, Progress) and not cancel.is_set():
                cancel.set()
                started_at.append(time.monotonic())
    assert time.monotonic() - started_at[0] < 2.0
    assert list(tmp_path.iterdir()) == []  # the spooled copy of the moov-at-end MP4 is gone
    # the tracker is free again
    assert sum(isinstance(e, Progress) for e in seen) == 1


def test_cancel_from_another_thread_mid_batch(tracker: PoseTracker, street_path: Path) -> None:
    cancel = threading.Event()
    set_at: list[float] = []

    def cancel_soon() -> None:
        set_at.append(time.monotonic())
        cancel.set()

    timer = threading.Timer(1.0, cancel_soon)  # lands inside some batch: several people per frame
    timer.start()
    with pytest.raises(TrackingCancelled):
        for _ in tracker.track(street_path, cancel=cancel):
            pass
    assert time.monotonic() - set_at[0] < 2.0


def test_cancel_while_waiting_for_bytes(tracker: PoseTracker, tmp_path: Path) -> None:
    feed = ByteFeed()
    feed.feed(b"\x1a\x45\xdf\xa3")  # looks like Matroska, then nothing more arrives
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(TrackingCancelled):
        for _ in tracker.track(feed, cancel=cancel, spool_dir=tmp_path):
            pass
    assert time.monotonic() - started < 2.3


def test_closing_the_generator_stops_the_decoder(tracker: PoseTracker, runner_path: Path) -> None:
    events = tracker.track(runner_path)
    next(events)
    events.close()
    assert not any(t.name == "tracker-decode" for t in threading.enumerate())
    # usable again afterwards
    assert isinstance(next(iter(tracker.track(runner_path))), VideoOpened)
