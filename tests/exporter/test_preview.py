"""The preview of a phone clip (coded sideways, display matrix) is drawn upright, with the skeleton
where the tracker found it in the upright picture. Clips are made with ffmpeg at test time."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from exporter_svc.preview import render_preview
from mocap_common.overlay import track_color
from mocap_common.poses import NUM_LANDMARKS, PoseTrack
from tests.video_corpus import FFMPEG, clip, make_clip, require_tools

MARK = (100.0, 50.0)  # x, y in the upright picture's pixels


def _marker_track() -> PoseTrack:
    """Frame 0 only, every landmark on MARK: a dot the size of a joint."""
    image = np.zeros((1, NUM_LANDMARKS, 5), np.float32)
    image[0, :, :2], image[0, :, 3:] = MARK, 1.0
    return PoseTrack(1, np.array([0]), np.array([0.0]), image, np.zeros((1, NUM_LANDMARKS, 3), np.float32),
                     np.zeros((1, 4), np.float32), np.ones(1, np.float32))


def _ffmpeg_view(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Frame 1 as ffmpeg's autorotating decoder shows it."""
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-vf", "select=eq(n\\,1)", "-frames:v", "1", "-f",
                          "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(size[1], size[0], 3).astype(np.int16)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_phone_preview_is_upright(rotation: int, tmp_path: Path) -> None:
    phone = clip(f"phone_rotate_{rotation}")
    video = make_clip(phone, require_tools(phone), tmp_path)
    out = tmp_path / "preview.mp4"
    assert render_preview(video, [_marker_track()], out, stop=threading.Event()) == 45
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24").astype(np.int16) for f in container.decode(video=0)]
    assert frames[0].shape == (362, 640, 3)  # upright, as shown by a player
    x, y = int(MARK[0]), int(MARK[1])
    assert np.abs(frames[0][y, x] - track_color(1)).max() < 40  # the dot sits where the landmarks are
    assert np.abs(frames[1] - _ffmpeg_view(video, (640, 362))).mean() < 6.0  # same picture (lossy encode)
