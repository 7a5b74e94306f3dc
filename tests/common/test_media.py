"""mocap_common.media: display-matrix orientation, presentation timestamps, damaged frames skipped
and counted, no av at package import."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import pytest

from mocap_common.media import UPRIGHT, Orientation, PresentationClock, orientation_from_matrix
from tests import damaged_media
from tests.support import REPO, RUNNER_MP4

if TYPE_CHECKING:
    from mocap_common.media import DecodeDamage

ONE = 1 << 16
PICTURE = np.arange(2 * 3).reshape(2, 3)  # 2 rows, 3 columns: every turn and mirror is distinct


def _matrix(a: int, b: int, c: int, d: int) -> np.ndarray:
    return np.array([a * ONE, b * ONE, 0, c * ONE, d * ONE, 0, 0, 0, 1 << 30], dtype=np.int32)


@pytest.mark.parametrize(("matrix", "expected"), [
    (_matrix(1, 0, 0, 1), PICTURE),
    (_matrix(0, -1, 1, 0), np.rot90(PICTURE, 1)),  # FFmpeg rotation +90 (counter-clockwise)
    (_matrix(-1, 0, 0, -1), np.rot90(PICTURE, 2)),
    (_matrix(0, 1, -1, 0), np.rot90(PICTURE, -1)),  # rotation -90: a phone's rotate=270
    (_matrix(-1, 0, 0, 1), PICTURE[:, ::-1]),  # mirrored left-right
    (_matrix(0, 1, 1, 0), PICTURE.T),  # transposed (a quarter turn and a mirror)
])
def test_display_matrix_turns_the_picture_as_ffmpeg_defines_it(matrix: np.ndarray, expected: np.ndarray) -> None:
    # FFmpeg: x' = a·x + c·y, y' = b·x + d·y. Check the picture against that map point by point.
    a, b, c, d = (matrix[i] / ONE for i in (0, 1, 3, 4))
    turned = orientation_from_matrix(matrix).apply(PICTURE)
    np.testing.assert_array_equal(turned, expected)
    xs, ys = a * np.arange(3)[None, :] + c * np.arange(2)[:, None], b * np.arange(3)[None, :] + d * np.arange(2)[:, None]
    cols, rows = (xs - xs.min()).astype(int), (ys - ys.min()).astype(int)
    np.testing.assert_array_equal(turned[rows, cols], PICTURE)
    assert turned.flags.c_contiguous


def test_an_arbitrary_angle_keeps_the_coded_picture() -> None:
    cos, sin = int(np.cos(np.pi / 6) * ONE), int(np.sin(np.pi / 6) * ONE)
    matrix = np.array([cos, -sin, 0, sin, cos, 0, 0, 0, 1 << 30], dtype=np.int32)
    assert orientation_from_matrix(matrix) == UPRIGHT
    assert Orientation(transpose=True).upright_size(362, 640) == (640, 362)


def _clock(slot_timed: bool = False) -> PresentationClock:
    return PresentationClock(slot_timed=slot_timed, start=0, time_base=Fraction(1, 30), frame_s=1 / 30)


def _frame(pts: int | None, duration: int = 0) -> SimpleNamespace:
    return SimpleNamespace(pts=pts, duration=duration)


def test_stored_timestamps_are_used_as_they_are() -> None:
    clock = _clock()
    assert [clock.stamp(_frame(p)) for p in (0, 1, 3, 4)] == pytest.approx([0, 1 / 30, 3 / 30, 4 / 30])


def test_untrusted_timestamps_still_increase_by_a_frame() -> None:
    # Missing, repeated and backwards times: each lands one frame duration after the last.
    clock = _clock()
    stamps = [clock.stamp(_frame(p, duration=d)) for p, d in ((None, 0), (2, 0), (2, 0), (1, 2), (None, 0), (9, 0))]
    assert stamps == pytest.approx([0, 2 / 30, 3 / 30, 5 / 30, 6 / 30, 9 / 30])
    assert np.all(np.diff(stamps) > 0)


def test_slot_timed_frames_take_the_slots_in_order() -> None:
    # AVI with B-frames: chunks in decode order I P B B, dts 0 1 2 3; libavformat's invented pts
    # (dts + 1) come back on the frames reordered as 1 3 4 2. Frames take the slots 0 1 2 3.
    clock = _clock(slot_timed=True)
    stamps = []
    for dts, out_pts in ((0, None), (1, 1), (2, 3), (3, 4)):
        clock.packet(SimpleNamespace(size=100, dts=dts))
        if out_pts is not None:
            stamps.append(clock.stamp(_frame(out_pts)))
    clock.packet(SimpleNamespace(size=0, dts=None))  # the flush packet
    stamps.append(clock.stamp(_frame(2)))
    assert stamps == pytest.approx([0, 1 / 30, 2 / 30, 3 / 30])


def test_a_refused_frame_gives_up_its_slot() -> None:
    # AVI without B-frames: chunks 0..4; the decoder refuses chunk 2. The frames of chunks 3 and 4
    # keep their own slots instead of moving up into the refused one.
    clock = _clock(slot_timed=True)
    stamps = []
    for dts in range(5):
        clock.packet(SimpleNamespace(size=100, dts=dts))
        if dts == 2:
            clock.skip()
        else:
            stamps.append(clock.stamp(_frame(dts + 1)))
    assert stamps == pytest.approx([0, 1 / 30, 3 / 30, 4 / 30])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("damaged")
    mp4 = damaged_media.runner_clip(tmp / "clip.mp4")
    h264_avi = damaged_media.runner_clip(tmp / "clip.avi")
    xvid_avi = damaged_media.runner_clip(tmp / "xvid.avi", damaged_media.XVID)
    return {
        # The case: 4 kB of garbage in the middle of the demo clip.
        "demo_mp4_middle": (RUNNER_MP4, damaged_media.overwrite_middle(RUNNER_MP4, tmp / "demo-middle.mp4")),
        "mp4_packet": (mp4, damaged_media.overwrite_packet(mp4, tmp / "clip-packet.mp4")),
        "mp4_keyframe": (mp4, damaged_media.overwrite_packet(mp4, tmp / "clip-key.mp4", keyframe=True)),
        # AVI: the slot clock; MPEG-4 Part 2 also drops the frames after a refused keyframe silently.
        "avi_xvid_keyframe": (xvid_avi, damaged_media.overwrite_packet(xvid_avi, tmp / "xvid-key.avi", keyframe=True)),
        "avi_h264_bframes_keyframe": (h264_avi, damaged_media.overwrite_packet(h264_avi, tmp / "clip-key.avi",
                                                                               keyframe=True)),
    }


def _decode(path: Path) -> tuple[dict[int, float], list[float], "DecodeDamage"]:
    import av

    from mocap_common.media import DecodeDamage, presentation_frames

    damage = DecodeDamage()
    times: dict[int, float] = {}
    order: list[float] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads, as the tracker and the preview decode
        for timed in presentation_frames(container, stream, damage):
            times[timed.frame.pts] = timed.timestamp_s
            order.append(timed.timestamp_s)
    return times, order, damage


@pytest.mark.parametrize("case", ["demo_mp4_middle", "mp4_packet", "mp4_keyframe", "avi_xvid_keyframe",
                                  "avi_h264_bframes_keyframe"])
def test_damaged_frames_are_skipped_counted_and_the_rest_keep_their_times(clips, case: str) -> None:
    clean_path, damaged_path = clips[case]
    clean, _, clean_damage = _decode(clean_path)
    times, order, damage = _decode(damaged_path)  # before: InvalidDataError from avcodec_send_packet()
    assert clean_damage.undecodable == 0
    lost = set(clean) - set(times)
    assert set(times) <= set(clean)
    assert damage.undecodable == len(lost) and 1 <= damage.undecodable <= 5, (damage, sorted(lost))
    assert len(times) + damage.undecodable == len(clean)
    assert np.all(np.diff(order) > 0)
    moved = sorted(pts for pts, t in times.items() if abs(t - clean[pts]) > 1e-6)
    # Every other frame keeps its presentation time: exactly where the container stores them (MP4)
    # or without B-frames (Xvid here); with B-frames only the frames reordered around the damage
    # (the next mini-GOP) may take a neighbour's slot.
    limit = 3 if case == "avi_h264_bframes_keyframe" else 0
    assert len(moved) <= limit, moved
    assert damage.first_error  # FFmpeg's text, for the log


def test_a_heavily_damaged_video_counts_every_lost_frame(clips, tmp_path: Path) -> None:
    clean_path, _ = clips["mp4_packet"]
    damaged = damaged_media.damage_packets(clean_path, tmp_path / "heavy.mp4", 0.4)
    times, order, damage = _decode(tmp_path / "heavy.mp4")
    assert damaged >= 24
    assert len(times) + damage.undecodable == damaged_media.FRAMES
    assert damage.undecodable >= damaged and np.all(np.diff(order) > 0)


def test_mocap_common_does_not_import_av() -> None:
    # The smoother and the broker install no PyAV; only mocap_common.media imports it.
    code = "import sys, mocap_common, mocap_common.poses, mocap_common.server; print('av' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
