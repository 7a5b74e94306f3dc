"""What is in an uploaded file: container, codec, size, frame count, frame rate and duration.

The probe opens the file with PyAV (FFmpeg) and checks that it is complete: for MP4/MOV, whose
index lists every frame, by reading the last frames; for other containers by reading every
packet of the video stream (no decoding). Then it decodes from the start until the first frame
to prove the stream decodes. Its cost does not grow with the video's resolution.

Rejections are `ProbeError`s with the ErrorReason the API reports (NOT_A_VIDEO or NO_FRAMES).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from mocap_common.media import upright_size

# Containers a camera, phone or editor writes. Anything else FFmpeg can open (text shown as ANSI
# art, single images, playlists, ...) is not a video for this service.
CONTAINER_EXTENSIONS: dict[str, str] = {
    "mov,mp4,m4a,3gp,3g2,mj2": "mp4",
    "matroska,webm": "mkv",
    "avi": "avi",
    "mpegts": "ts",
    "mpeg": "mpg",
    "flv": "flv",
    "asf": "wmv",
    "ogg": "ogv",
    "mxf": "mxf",
    "nut": "nut",
    "h264": "h264",
    "hevc": "hevc",
}
# Containers whose index gives every frame's size and place: the probe checks the last frames
# instead of reading every packet (a 200 MB file probes in milliseconds, not a full read).
INDEXED_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2"})
# Decoding the first frame may need a few packets (B-frame reordering); a stream that yields no
# picture within this many is not decodable.
_FIRST_FRAME_PACKETS = 256


class ProbeError(Exception):
    """The file is not a usable video; `reason` is an ErrorReason name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ProbeResult:
    container: str  # FFmpeg's name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    extension: str  # the file extension the gateway stores it under, e.g. "mp4"
    codec: str
    width: int  # as displayed: a sideways-coded phone clip with a quarter-turn display matrix is
    height: int  # reported upright (the tracker decodes it upright too)
    frame_count: int
    fps: float
    duration_s: float


def probe_video(path: Path) -> ProbeResult:
    """Probes `path`; raises ProbeError(NOT_A_VIDEO | NO_FRAMES) for unusable files."""
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise ProbeError("NOT_A_VIDEO", f"the file is not a readable video ({_short(exc)})") from None
    with container:
        fmt = container.format.name
        if fmt not in CONTAINER_EXTENSIONS:
            raise ProbeError("NOT_A_VIDEO", f"the file is not a video container (found {fmt!r})")
        if not container.streams:
            raise ProbeError("NO_FRAMES", "the video has no streams")
        if not container.streams.video:
            raise ProbeError("NOT_A_VIDEO", "the file has no video stream")
        stream = container.streams.video[0]
        declared = int(stream.frames or 0)
        if fmt in INDEXED_CONTAINERS and declared and stream.duration:
            # The index lists every frame: only the last ones can be missing from a cut file.
            _check_tail(container, stream)
            packets, last_pts, duration_pts = declared, None, 0
        else:
            packets, last_pts, duration_pts = _count_packets(container, stream)
        if packets == 0:
            raise ProbeError("NO_FRAMES", "the video has no frames")
        if declared and packets < declared:
            raise ProbeError("NOT_A_VIDEO", f"the video is truncated: {packets} of {declared} frames are present")
        frame_count = declared or packets
        duration_s = _duration_s(container, stream, last_pts, duration_pts)
        if stream.average_rate:
            fps = float(stream.average_rate)
        else:
            fps = frame_count / duration_s if duration_s > 0 else 0.0
        codec = stream.codec_context.name
    width, height = _first_frame_size(path)
    return ProbeResult(
        container=fmt,
        extension=CONTAINER_EXTENSIONS[fmt],
        codec=codec,
        width=width,
        height=height,
        frame_count=frame_count,
        fps=fps,
        duration_s=duration_s or (frame_count / fps if fps else 0.0),
    )


def _count_packets(container: av.container.InputContainer, stream: av.VideoStream) -> tuple[int, int | None, int]:
    """Packets with data, the largest pts seen, and that packet's duration. A damaged last
    packet (the file ends inside it) means the file was cut short."""
    count, last_pts, last_duration = 0, None, 0
    last_corrupt = False
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            count += 1
            last_corrupt = packet.is_corrupt
            if packet.pts is not None and (last_pts is None or packet.pts > last_pts):
                last_pts, last_duration = packet.pts, int(packet.duration or 0)
    except (av.FFmpegError, OSError) as exc:
        raise ProbeError("NOT_A_VIDEO", f"the video is damaged or truncated ({_short(exc)})") from None
    if last_corrupt:
        raise ProbeError("NOT_A_VIDEO", "the video is truncated: its last frame is incomplete")
    return count, last_pts, last_duration


def _check_tail(container: av.container.InputContainer, stream: av.VideoStream) -> None:
    """Reads the packets at the end of the stream; a cut file lacks them or has them damaged."""
    end = (stream.start_time or 0) + stream.duration
    try:
        container.seek(max(end - 1, 0), stream=stream, backward=True, any_frame=True)
        tail = [p for p in container.demux(stream) if p.size]
    except (av.FFmpegError, OSError) as exc:
        raise ProbeError("NOT_A_VIDEO", f"the video is damaged or truncated ({_short(exc)})") from None
    if not tail or tail[-1].is_corrupt:
        raise ProbeError("NOT_A_VIDEO", "the video is truncated: its last frames are missing or incomplete")


def _first_frame_size(path: Path) -> tuple[int, int]:
    """Decodes from the start until the first picture (a fresh open: the count read to the end)
    and gives its size as displayed: a phone's sideways-coded picture with a quarter-turn display
    matrix is reported upright, as the tracker will see it."""
    try:
        with av.open(str(path), mode="r") as container:
            stream = container.streams.video[0]
            for i, packet in enumerate(container.demux(stream)):
                for frame in packet.decode():
                    return upright_size(frame)
                if i >= _FIRST_FRAME_PACKETS:
                    break
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise ProbeError("NOT_A_VIDEO", f"the video does not decode ({_short(exc)})") from None
    raise ProbeError("NO_FRAMES", "the video has no decodable frames")


def _duration_s(container: av.container.InputContainer, stream: av.VideoStream, last_pts: int | None,
                last_duration: int) -> float:
    time_base: Fraction | None = stream.time_base
    if stream.duration and time_base:
        return float(stream.duration * time_base)
    if container.duration:
        return container.duration / 1_000_000
    if last_pts is not None and time_base:
        start = stream.start_time or 0
        return float((last_pts + last_duration - start) * time_base)
    return 0.0


def _short(exc: BaseException) -> str:
    # FFmpeg messages name the file path; the client should see neither paths nor internals.
    text = re.sub(r":\s*'[^']*'$", "", str(exc))
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    return text[:200]
