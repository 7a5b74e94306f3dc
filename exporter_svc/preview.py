"""Preview MP4: the input video with every tracked skeleton drawn over it, one colour per track id.

Drawing and encoding are the shared overlay renderer (`mocap_common.overlay`), so the preview
looks exactly like the tracker's own overlays; this module decodes the spooled input, scales it
down to at most PREVIEW_MAX_HEIGHT lines (a preview need not be full size, and encoding cost grows
with pixels: 1080p → 720p makes it ~2× cheaper), scales the landmarks to match, and stops between
frames when the call is cancelled. The skeletons are the tracks' image landmarks as received (the
landmarks the animation was solved from), drawn on the frames with the same decode index. Frames
are decoded upright (mocap_common.media), as the tracker decoded them: a phone clip coded sideways
with a display matrix previews upright, and its landmarks land on the picture they came from.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from mocap_common.errors import Cancelled, FieldViolation, InvalidArgument
from mocap_common.media import TimedFrame, presentation_frames, upright_rgb, upright_size
from mocap_common.poses import PoseTrack, PoseTrackSet, VideoInfo
from mocap_common.overlay import write_overlay_video

PREVIEW_MAX_HEIGHT = 720


def render_preview(video_path: Path, tracks: list[PoseTrack], out_path: Path, *, stop: threading.Event) -> int:
    """Writes the preview; returns the number of frames. Raises InvalidArgument (NOT_A_VIDEO)
    when the input cannot be decoded and Cancelled when `stop` is set."""
    try:
        with av.open(str(video_path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = presentation_frames(container, stream)
            first = next(frames, None)
            if first is None:
                raise _not_a_video()
            # Upright, as the tracker saw it: its landmarks are in the upright picture's pixels.
            width, height = upright_size(first.frame)
            if not width or not height:
                raise _not_a_video()
            size = _preview_size(width, height)
            fps = float(stream.average_rate or stream.guessed_rate or 30)
            info = VideoInfo(width=size[0], height=size[1], fps=fps, frame_count=stream.frames, duration_s=0.0)
            track_set = PoseTrackSet(video=info, tracks=[_scaled(t, size[0] / width, size[1] / height) for t in tracks])
            pictures = _pictures(itertools.chain([first], frames), size, stop)
            result = write_overlay_video(pictures, track_set, out_path, fps=fps)
    except (av.error.FFmpegError, IndexError) as exc:  # IndexError: no video stream
        raise _not_a_video() from exc
    if result.frames == 0:
        raise _not_a_video()
    return result.frames


def _preview_size(width: int, height: int) -> tuple[int, int]:
    """At most PREVIEW_MAX_HEIGHT lines, even sides (4:2:0 encoders need them)."""
    scale = min(1.0, PREVIEW_MAX_HEIGHT / height)
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def _not_a_video() -> InvalidArgument:
    return InvalidArgument("the video sent for the preview cannot be decoded", reason="NOT_A_VIDEO",
                           violations=[FieldViolation("video_chunk", "not a decodable video")])


def _scaled(track: PoseTrack, sx: float, sy: float) -> PoseTrack:
    image = track.image.copy()
    image[..., 0] *= sx
    image[..., 1] *= sy
    return dataclasses.replace(track, image=image)


def _pictures(frames: Iterator[TimedFrame], size: tuple[int, int], stop: threading.Event) -> Iterator[np.ndarray]:
    for timed in frames:
        if stop.is_set():
            raise Cancelled("export cancelled")
        yield upright_rgb(timed.frame, size)
