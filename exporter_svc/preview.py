"""Preview MP4: the input video with every tracked skeleton drawn over it, one colour per track id.

Drawing and encoding are the tracker's overlay renderer (`tracker_svc.overlay`), so the preview
looks exactly like the tracker's own overlays; this module decodes the spooled input, scales it
down to at most PREVIEW_MAX_HEIGHT lines (a preview need not be full size, and encoding cost grows
with pixels: 1080p → 720p makes it ~2× cheaper), scales the landmarks to match, and stops between
frames when the call is cancelled. The skeletons are the tracks' image landmarks as received (the
landmarks the animation was solved from), drawn on the frames with the same decode index.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from mocap_common.errors import Cancelled, FieldViolation, InvalidArgument
from mocap_common.poses import PoseTrack, PoseTrackSet, VideoInfo
from tracker_svc.overlay import write_overlay_video

PREVIEW_MAX_HEIGHT = 720


def render_preview(video_path: Path, tracks: list[PoseTrack], out_path: Path, *, stop: threading.Event) -> int:
    """Writes the preview; returns the number of frames. Raises InvalidArgument (NOT_A_VIDEO)
    when the input cannot be decoded and Cancelled when `stop` is set."""
    try:
        with av.open(str(video_path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            width, height = stream.codec_context.width, stream.codec_context.height
            if not width or not height:
                raise _not_a_video()
            scale = min(1.0, PREVIEW_MAX_HEIGHT / height)
            size = (max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2))
            fps = float(stream.average_rate or stream.guessed_rate or 30)
            info = VideoInfo(width=size[0], height=size[1], fps=fps, frame_count=stream.frames, duration_s=0.0)
            track_set = PoseTrackSet(video=info, tracks=[_scaled(t, size[0] / width, size[1] / height) for t in tracks])
            frames = _frames(container, stream, size, stop)
            result = write_overlay_video(frames, track_set, out_path, fps=fps)
    except (av.error.FFmpegError, IndexError) as exc:  # IndexError: no video stream
        raise _not_a_video() from exc
    if result.frames == 0:
        raise _not_a_video()
    return result.frames


def _not_a_video() -> InvalidArgument:
    return InvalidArgument("the video sent for the preview cannot be decoded", reason="NOT_A_VIDEO",
                           violations=[FieldViolation("video_chunk", "not a decodable video")])


def _scaled(track: PoseTrack, sx: float, sy: float) -> PoseTrack:
    image = track.image.copy()
    image[..., 0] *= sx
    image[..., 1] *= sy
    return dataclasses.replace(track, image=image)


def _frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream, size: tuple[int, int],
            stop: threading.Event) -> Iterator[np.ndarray]:
    for frame in container.decode(stream):
        if stop.is_set():
            raise Cancelled("export cancelled")
        yield frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
