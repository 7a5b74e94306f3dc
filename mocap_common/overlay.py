"""Skeleton overlays: draw PoseTracks over RGB frames and write them as an MP4.

Shared by the tracker's debug command (`python -m tracker_svc track --overlay`) and the exporter's
preview video, so both draw the same skeletons in the same colours. It lives here rather than in
either service because services never import each other: each container installs only its own
extra. Needs numpy and PyAV (in the tracker's and the exporter's extras; not in the base
dependencies, so import this module only from a service that has PyAV), no models, no torch:

    write_overlay_video(frames, track_set, "preview.mp4")   # frames: iterable of (H, W, 3) uint8

Each track id has its own colour from a fixed palette (the same id is the same colour in every
video); bones are SKELETON_EDGES between landmarks whose visibility passes a threshold.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mocap_common.poses import SKELETON_EDGES, PoseTrackSet

# Distinct, saturated colours for the first ids; later ids walk the hue circle by the golden angle.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)
_EDGES = np.array(SKELETON_EDGES, dtype=np.int64)
MIN_VISIBILITY = 0.5


def track_color(track_id: int) -> tuple[int, int, int]:
    """The deterministic RGB colour of a track id."""
    if 0 <= track_id < len(_PALETTE):
        return _PALETTE[track_id]
    hue = (track_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_skeleton(
    frame: np.ndarray, image_landmarks: np.ndarray, color: tuple[int, int, int], *,
    thickness: int | None = None, min_visibility: float = MIN_VISIBILITY,
) -> None:
    """Draws one pose in place on an (H, W, 3) uint8 frame.

    image_landmarks: (33, 5) x px, y px, z, visibility, presence. Bones need both ends visible.
    thickness: line width in pixels (default: 1/270 of the frame height, at least 2).
    """
    height, width = frame.shape[:2]
    thickness = thickness or max(2, round(height / 270))
    visible = image_landmarks[:, 3] >= min_visibility
    xy = image_landmarks[:, :2].astype(np.float64)
    edges = _EDGES[visible[_EDGES[:, 0]] & visible[_EDGES[:, 1]]]
    points = np.concatenate([_segment_points(xy[edges[:, 0]], xy[edges[:, 1]]), xy[visible]])
    _stamp(frame, points, thickness // 2, color)
    _stamp(frame, xy[visible], thickness // 2 + 1, color)  # joints a little bigger than bones


def _segment_points(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Points every ≤ 1 px along each segment (M, 2) → (K, 2), all segments at once."""
    if len(start) == 0:
        return np.zeros((0, 2))
    length = np.linalg.norm(end - start, axis=1)
    counts = np.minimum(np.ceil(length).astype(np.int64) + 1, 20000)  # guard absurd coordinates
    segment = np.repeat(np.arange(len(start)), counts)
    step = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    t = step / np.maximum(counts[segment] - 1, 1)
    return start[segment] + (end[segment] - start[segment]) * t[:, None]


def _stamp(frame: np.ndarray, points: np.ndarray, radius: int, color: tuple[int, int, int]) -> None:
    """Paints a (2r+1)² square around each point, clipped to the frame."""
    if len(points) == 0:
        return
    height, width = frame.shape[:2]
    offsets = np.arange(-radius, radius + 1)
    centre = np.rint(points).astype(np.int64)
    xs = (centre[:, 0, None, None] + offsets[None, None, :]).repeat(len(offsets), axis=1).reshape(-1)
    ys = (centre[:, 1, None, None] + offsets[None, :, None]).repeat(len(offsets), axis=2).reshape(-1)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    frame[ys[inside], xs[inside]] = color


def poses_by_frame(track_set: PoseTrackSet) -> dict[int, list[tuple[int, np.ndarray]]]:
    """frame index → [(track id, (33, 5) landmarks)] for every frame some track covers."""
    frames: dict[int, list[tuple[int, np.ndarray]]] = {}
    for track in track_set.tracks:
        for row, index in enumerate(track.frame_index):
            frames.setdefault(int(index), []).append((track.track_id, track.image[row]))
    return frames


def draw_frame(frame: np.ndarray, poses: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """A copy of `frame` with every pose drawn in its track's colour."""
    out = frame.copy()
    for track_id, landmarks in poses:
        draw_skeleton(out, landmarks, track_color(track_id))
    return out


@dataclass(frozen=True)
class OverlayResult:
    path: Path
    frames: int
    codec: str


def write_overlay_video(
    frames: Iterable[np.ndarray], track_set: PoseTrackSet, out_path: Path | str, *,
    fps: float | None = None, codec: str | None = None,
) -> OverlayResult:
    """Writes `frames` (decode order, index 0 first) with the tracks drawn on them as an MP4.

    fps: output rate (default: the track set's video fps, else 30). codec: "libx264" when PyAV's
    FFmpeg has it, else "mpeg4". Odd frame sizes lose their last row/column (yuv420p needs even).
    """
    out_path = Path(out_path)
    codec = codec or preferred_codec()
    rate = Fraction(fps or track_set.video.fps or 30).limit_denominator(1001)
    by_frame = poses_by_frame(track_set)
    written = 0
    with av.open(str(out_path), mode="w") as container:
        stream = None
        for index, frame in enumerate(frames):
            if stream is None:
                stream = _add_stream(container, codec, rate, frame.shape[1], frame.shape[0])
            drawn = draw_frame(frame, by_frame.get(index, []))[: stream.height, : stream.width]
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(drawn), format="rgb24")
            container.mux(stream.encode(video_frame))
            written += 1
        if stream is not None:
            container.mux(stream.encode(None))
    return OverlayResult(out_path, written, codec)


def preferred_codec() -> str:
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except (av.error.FFmpegError, ValueError):
        return "mpeg4"


def _add_stream(
    container: av.container.OutputContainer, codec: str, rate: Fraction, width: int, height: int,
) -> av.video.stream.VideoStream:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = width - width % 2, height - height % 2
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
        stream.options = {"crf": "20", "preset": "veryfast"}
    else:
        stream.bit_rate = 8_000_000
    return stream
