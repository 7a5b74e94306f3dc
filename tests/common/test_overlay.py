"""The overlay renderer: a decodable MP4, one frame per input frame, skeletons in track colours."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from mocap_common.poses import PoseTrack, PoseTrackSet, VideoInfo
from mocap_common.overlay import draw_frame, track_color, write_overlay_video

WIDTH, HEIGHT, FRAMES = 320, 240, 12


def _standing_pose(x_offset: float) -> np.ndarray:
    """A crude upright skeleton: shoulders, hips, knees, ankles on two vertical lines."""
    image = np.zeros((33, 5), np.float32)
    image[:, 3:] = 1.0
    image[:, 0] = x_offset
    image[:, 1] = 60
    for left, right, y in [(11, 12, 80), (23, 24, 140), (25, 26, 170), (27, 28, 200), (13, 14, 110), (15, 16, 130)]:
        image[left, :2] = (x_offset - 15, y)
        image[right, :2] = (x_offset + 15, y)
    return image


def _track_set() -> PoseTrackSet:
    tracks = []
    for track_id, x, frames in [(0, 90.0, range(FRAMES)), (1, 230.0, range(4, FRAMES))]:
        frames = np.array(list(frames))
        n = len(frames)
        tracks.append(PoseTrack(
            track_id=track_id, frame_index=frames, timestamp_s=frames / 25.0,
            image=np.repeat(_standing_pose(x)[None], n, 0), world=np.zeros((n, 33, 3), np.float32),
            bbox=np.zeros((n, 4), np.float32), score=np.ones(n, np.float32),
        ))
    return PoseTrackSet(VideoInfo(WIDTH, HEIGHT, 25.0, FRAMES, FRAMES / 25.0), tracks)


def test_colours_are_deterministic_and_distinct() -> None:
    assert track_color(0) == track_color(0)
    colours = {track_color(i) for i in range(40)}
    assert len(colours) == 40


def test_draw_frame_paints_bones_in_track_colour() -> None:
    frame = np.full((HEIGHT, WIDTH, 3), 40, np.uint8)
    pose = _standing_pose(90.0)
    drawn = draw_frame(frame, [(3, pose)])
    colour = np.array(track_color(3))
    # midpoint of the left thigh (23 → 25) lies on a bone
    mid = np.rint((pose[23, :2] + pose[25, :2]) / 2).astype(int)
    assert np.array_equal(drawn[mid[1], mid[0]], colour)
    assert np.all(frame == 40), "the input frame is left untouched"
    # far from the skeleton nothing changed
    assert np.all(drawn[:, 200:] == 40)


def test_invisible_landmarks_are_not_drawn() -> None:
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pose = _standing_pose(90.0)
    pose[:, 3] = 0.1
    assert np.all(draw_frame(frame, [(0, pose)]) == 0)


def test_write_overlay_video(tmp_path: Path) -> None:
    frames = [np.full((HEIGHT, WIDTH, 3), 30, np.uint8) for _ in range(FRAMES)]
    result = write_overlay_video(frames, _track_set(), tmp_path / "overlay.mp4")
    assert result.frames == FRAMES
    with av.open(str(result.path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == FRAMES
    assert decoded[0].shape == (HEIGHT, WIDTH, 3)
    red, green = np.array(track_color(0)), np.array(track_color(1))

    def near(pixel: np.ndarray, colour: np.ndarray) -> bool:
        return bool(np.abs(pixel.astype(int) - colour).max() < 60)  # lossy H.264/MPEG-4 colours

    pose0, pose1 = _standing_pose(90.0), _standing_pose(230.0)
    thigh0 = np.rint((pose0[23, :2] + pose0[25, :2]) / 2).astype(int)
    thigh1 = np.rint((pose1[23, :2] + pose1[25, :2]) / 2).astype(int)
    assert near(decoded[0][thigh0[1], thigh0[0]], red)
    assert near(decoded[8][thigh1[1], thigh1[0]], green)
    assert not near(decoded[0][thigh1[1], thigh1[0]], green)  # track 1 starts at frame 4
    assert np.abs(decoded[0][10, 300].astype(int) - 30).max() < 10  # background untouched
