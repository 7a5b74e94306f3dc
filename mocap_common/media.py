"""Decoding video the way a viewer sees it: the picture upright, the frames at their presentation times.

FFmpeg's libraries leave both to the caller (its command-line tools do them, libav* does not), so
every service that decodes pictures (the gateway's probe, the tracker, the exporter's preview)
uses this one module:

    for timed in presentation_frames(container, stream):
        timed.timestamp_s            # seconds from the stream start, strictly increasing
        upright_rgb(timed.frame)     # (H, W, 3) uint8, turned as the display matrix says

Orientation. A phone stores the picture as the sensor saw it (sideways when held upright) plus a
display matrix saying how to turn it for display. PyAV 18 (FFmpeg 8) copies the stream's matrix onto
every decoded frame as DISPLAYMATRIX side data and has no reader for the stream's own copy, so the
frame's is the one read here. Right-angle rotations and mirrorings are applied exactly; any other
angle (which no camera writes) is ignored and the picture is used as coded.

Presentation time. Most containers (MP4/MOV, Matroska/WebM, MPEG-TS/PS, FLV, ...) store each
frame's presentation timestamp, and the decoder hands it back on the frame, reordered with the
picture: those are used as they are. AVI and raw elementary streams store none: an AVI chunk is
one frame slot in decode order (its dts), and libavformat invents a pts for it that ignores
B-frame reordering, so frames come out as 0.033, 0.1, 0.133, 0.067, ... For those, the k-th frame
in presentation order is shown in the k-th frame slot: the smallest dts not yet taken. Whatever
the source, a frame whose time is missing or not after the previous frame's is placed one frame
duration after it, so the times are always strictly increasing.

Only services that decode video import this module (its PyAV is in their extras, not in the base
dependencies); nothing else in mocap_common imports av.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

# Containers with no presentation timestamps: time is the frame slot (AVI's index entry, the
# parser's frame count in a raw stream), counted in decode order.
SLOT_TIMED_FORMATS = frozenset({"avi", "h264", "hevc", "m4v", "mpegvideo"})
# When a stream states no frame rate at all, a frame without a usable time is this far from the last.
FALLBACK_FRAME_S = 1 / 30
_ONE = 1 << 16  # display matrix entries are 16.16 fixed point


@dataclass(frozen=True)
class Orientation:
    """How to turn a decoded picture upright: transpose first, then mirror rows and/or columns."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The upright picture, C-contiguous (torch.from_numpy refuses negative strides)."""
        if self == UPRIGHT:
            return image
        view = image.transpose(1, 0, *range(2, image.ndim)) if self.transpose else image
        if self.flip_rows:
            view = view[::-1]
        if self.flip_cols:
            view = view[:, ::-1]
        return np.ascontiguousarray(view)

    def upright_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the upright picture for a coded width × height."""
        return (height, width) if self.transpose else (width, height)


UPRIGHT = Orientation()


def orientation_from_matrix(matrix: np.ndarray) -> Orientation:
    """The Orientation a 3×3 display matrix (9 int32, FFmpeg's layout) describes.

    FFmpeg maps a source point (x, y) to the display point x' = a·x + c·y, y' = b·x + d·y with
    the matrix stored as [a b u; c d v; ...]. A right-angle turn or mirror has either b = c = 0
    (mirror x if a < 0, y if d < 0) or a = d = 0 (transpose; then x' = ±y mirrors columns when
    c < 0 and y' = ±x mirrors rows when b < 0).
    """
    a, b, c, d = (int(matrix[i]) for i in (0, 1, 3, 4))
    near_zero = _ONE // 64  # ~1°: tolerate rounding in matrices written from float angles
    if abs(b) < near_zero and abs(c) < near_zero and abs(a) >= near_zero and abs(d) >= near_zero:
        return Orientation(flip_rows=d < 0, flip_cols=a < 0)
    if abs(a) < near_zero and abs(d) < near_zero and abs(b) >= near_zero and abs(c) >= near_zero:
        return Orientation(transpose=True, flip_rows=b < 0, flip_cols=c < 0)
    return UPRIGHT  # an arbitrary angle or a degenerate matrix: use the picture as coded


def frame_orientation(frame: av.VideoFrame) -> Orientation:
    """The Orientation the frame's DISPLAYMATRIX side data asks for (UPRIGHT when it has none)."""
    data = frame.side_data.get("DISPLAYMATRIX")
    if data is None:
        return UPRIGHT
    matrix = np.frombuffer(bytes(data), dtype=np.int32)
    return orientation_from_matrix(matrix) if matrix.size >= 9 else UPRIGHT


def upright_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(width, height) of the frame as displayed."""
    return frame_orientation(frame).upright_size(frame.width, frame.height)


def upright_rgb(frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
    """The frame as displayed, (H, W, 3) uint8 RGB; `size` = upright (width, height) to scale to."""
    orientation = frame_orientation(frame)
    if size is None:
        rgb = frame.to_ndarray(format="rgb24")
    else:
        width, height = orientation.upright_size(*size)  # the coded picture's size at that scale
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
    return orientation.apply(rgb)


@dataclass(frozen=True)
class TimedFrame:
    """A decoded frame and its presentation time in seconds from the stream start."""

    frame: av.VideoFrame
    timestamp_s: float


class PresentationClock:
    """Gives each decoded frame of one stream its presentation time (see the module docstring).

    Feed every demuxed packet to `packet()` before decoding it, then ask `stamp()` for each frame
    the decoder returns; frames come out of the decoder in presentation order.
    """

    def __init__(self, *, slot_timed: bool, start: int, time_base: Fraction | None, frame_s: float) -> None:
        self._slot_timed = slot_timed
        self._start = start
        self._time_base = time_base
        self._frame_s = frame_s
        self._slots: list[int] = []  # dts of packets whose frames have not come out yet (a min-heap)
        self._last: float | None = None

    @classmethod
    def for_stream(cls, container: av.container.InputContainer, stream: av.VideoStream) -> "PresentationClock":
        rate = stream.average_rate or stream.guessed_rate
        return cls(slot_timed=container.format.name in SLOT_TIMED_FORMATS, start=stream.start_time or 0,
                   time_base=stream.time_base, frame_s=float(1 / rate) if rate else FALLBACK_FRAME_S)

    def packet(self, packet: av.Packet) -> None:
        # An empty packet is the end-of-stream flush (or an AVI "drop frame" chunk): no slot of its own.
        if self._slot_timed and packet.size and packet.dts is not None:
            heapq.heappush(self._slots, packet.dts)

    def stamp(self, frame: av.VideoFrame) -> float:
        """The frame's presentation time, after the previous frame's."""
        ticks = self._ticks(frame)
        seconds = float((ticks - self._start) * self._time_base) if ticks is not None and self._time_base else None
        if seconds is None or (self._last is not None and seconds <= self._last):
            # Missing or out of order: cannot be trusted. One frame duration after the last keeps
            # the spacing a viewer would see for a frame shown right after its predecessor.
            seconds = 0.0 if self._last is None else self._last + self._frame_duration(frame)
        self._last = seconds
        return seconds

    def _ticks(self, frame: av.VideoFrame) -> int | None:
        if not self._slot_timed:
            return frame.pts
        return heapq.heappop(self._slots) if self._slots else None

    def _frame_duration(self, frame: av.VideoFrame) -> float:
        if frame.duration and self._time_base:
            return float(frame.duration * self._time_base)
        return self._frame_s


def presentation_frames(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[TimedFrame]:
    """Decodes `stream` to the end: frames in presentation order with strictly increasing times.
    Raises av.error.FFmpegError when the bytes do not decode."""
    clock = PresentationClock.for_stream(container, stream)
    for packet in container.demux(stream):
        clock.packet(packet)
        for frame in packet.decode():
            yield TimedFrame(frame, clock.stamp(frame))
