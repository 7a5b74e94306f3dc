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

Damaged bytes. A packet the decoder refuses (random bytes in a file's middle: FFmpeg raises
InvalidDataError from avcodec_send_packet) is skipped and counted in a `DecodeDamage`, and
decoding goes on: the decoder resyncs by itself at the next keyframe (frames between are decoded
with FFmpeg's error concealment, as a player shows them). A refusal costs one frame; frames a
decoder drops without a refusal (MPEG-4 Part 2 after a refused keyframe), or cannot hand back
(PyAV loses a frame-threaded decoder's last frames when its end-of-stream flush fails) are
counted too, from the packets left without a frame. The frames that decode come out in order
with their own times; for AVI a lost frame gives up the earliest slot not yet taken, so the
frames after it keep theirs (exactly without B-frames; with B-frames only frames in the reorder
window around the damage can move by a slot). Whether too much was lost is the caller's
decision (the tracker refuses more than 10 %). Not counted: what the demuxer skips while it
resyncs (it never reaches the decoder; Matroska skips to its next cluster, AVI and MPEG-TS drop
the damaged chunks, and AVI then numbers the later chunks, hence their slots, without them).
An error of the demuxer itself (the container, not a frame, is damaged) still ends the stream:
it is raised as an av.error.FFmpegError, whose text is for logs only (it names FFmpeg functions
and, for files, their paths).

Only services that decode video import this module (its PyAV is in their extras, not in the base
dependencies); nothing else in mocap_common imports av.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
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

    @property
    def slot_timed(self) -> bool:
        return self._slot_timed

    def skip(self) -> None:
        """One frame will never come out (the decoder refused it): its slot is not given to the
        frames after it. The earliest slot not yet taken is the missing frame's when frames come
        out in decode order; with B-frames, within the reorder window of it."""
        if self._slot_timed and self._slots:
            heapq.heappop(self._slots)

    def _ticks(self, frame: av.VideoFrame) -> int | None:
        if not self._slot_timed:
            return frame.pts
        return heapq.heappop(self._slots) if self._slots else None

    def _frame_duration(self, frame: av.VideoFrame) -> float:
        if frame.duration and self._time_base:
            return float(frame.duration * self._time_base)
        return self._frame_s


@dataclass
class DecodeDamage:
    """What `presentation_frames` skipped while decoding one stream (read it when the iteration ends).

    undecodable: frames the decoder never returned: each packet it refused, the frames it dropped
      while recovering, and, in a stream that had damage, every packet left without a frame at the
      end (PyAV cannot take frames out of a decoder whose end-of-stream flush failed). The
      decoders of every format in the video corpus return one frame per packet; the packets-left
      count is only taken for a stream that had refusals, so a clean stream counts 0.
    first_error: FFmpeg's text of the first refusal and where it happened: for the service log only
      (never for clients: it names FFmpeg functions and error numbers).
    """

    undecodable: int = 0
    packets: int = 0  # packets with data sent to the decoder (not those the container marks discard)
    frames: int = 0  # frames that came out
    recoveries: int = 0  # times the decoder had to be reset to go on (flush_buffers)
    first_error: str = ""
    errors: dict[str, int] = field(default_factory=dict)  # refusals by FFmpeg error class

    @property
    def damaged(self) -> bool:
        return bool(self.errors)

    def _refused(self, exc: av.error.FFmpegError, packet: av.Packet | None) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1
        if not self.first_error:
            where = f"packet dts {packet.dts}" if packet is not None and packet.size else "the end-of-stream flush"
            self.first_error = f"{name}: {exc} (at {where}, after {self.frames} frames)"

    def _pending(self) -> int:
        """Packets sent whose frames have not come out (and were not counted as lost)."""
        return max(0, self.packets - self.frames - self.undecodable)


def presentation_frames(container: av.container.InputContainer, stream: av.VideoStream,
                        damage: DecodeDamage | None = None) -> Iterator[TimedFrame]:
    """Decodes `stream` to the end: frames in presentation order with strictly increasing times.

    Packets the decoder refuses are skipped and counted in `damage` (see the module docstring).
    Raises av.error.FFmpegError when the container cannot be read on (demuxer errors), and
    av.error.MemoryError from the decoder."""
    clock = PresentationClock.for_stream(container, stream)
    damage = damage if damage is not None else DecodeDamage()
    depth = _DecoderDepth()
    for packet in container.demux(stream):
        clock.packet(packet)
        frames = _decode(stream.codec_context, packet, damage, clock)
        if frames and packet.size and clock.slot_timed:
            # Frames a damaged decoder dropped without a word still hold slots: give those up
            # before the next frames take theirs.
            _lose(damage, clock, depth.dropped(damage, len(frames)))
        for frame in frames:
            damage.frames += 1
            yield TimedFrame(frame, clock.stamp(frame))
    if damage.damaged:
        damage.undecodable += damage._pending()  # never came out: lost in the damage, or at the flush


def _decode(codec: av.codec.context.CodecContext, packet: av.Packet, damage: DecodeDamage,
            clock: PresentationClock) -> list[av.VideoFrame]:
    """The frames decoding `packet` gives; a refusal is counted (one frame lost) instead of raised."""
    if packet.size and not packet.is_discard:
        damage.packets += 1
    try:
        return packet.decode()
    except av.error.MemoryError:
        raise
    except av.error.BlockingIOError as exc:  # EAGAIN: see _recover
        damage._refused(exc, packet)
        if not packet.size:
            return []
        frames = _recover(codec, damage, clock)
        try:
            return frames + packet.decode()
        except av.error.MemoryError:
            raise
        except av.error.FFmpegError as again:
            damage._refused(again, packet)
            _lose(damage, clock, 1)
            return frames
    except av.error.FFmpegError as exc:
        # FFmpeg dropped the frame it could not decode; the next packets decode on, and the
        # decoder finds its footing again at the next keyframe.
        damage._refused(exc, packet)
        _lose(damage, clock, 1 if packet.size else damage._pending())
        return []


def _recover(codec: av.codec.context.CodecContext, damage: DecodeDamage, clock: PresentationClock) -> list[av.VideoFrame]:
    """After a refusal PyAV stopped reading a frame-threaded decoder that still held output, and
    the decoder now refuses every packet (EAGAIN) until that output is read, which PyAV cannot do
    without draining: drain it (those frames are good), then reset it to take packets again."""
    damage.recoveries += 1
    pending = damage._pending() - 1  # the packet being decoded is not in the decoder yet
    frames: list[av.VideoFrame] = []
    try:
        frames = codec.decode(None)
    except av.error.MemoryError:
        raise
    except av.error.FFmpegError as exc:
        damage._refused(exc, None)
    codec.flush_buffers()
    _lose(damage, clock, pending - len(frames))  # what the drain did not give back is gone
    return frames


class _DecoderDepth:
    """How many packets a decoder holds once it has given frames back (frame threads, B-frame
    reordering), learnt while the stream is clean. After damage, holding more than that for good
    means frames were dropped silently (an MPEG-4 Part 2 decoder drops the frames that refer to a
    keyframe it refused); those are counted, and their slots given up, as soon as it shows."""

    LEARN = 8  # clean packets with output before the depth is trusted

    def __init__(self) -> None:
        self.depth, self.seen = 0, 0

    def dropped(self, damage: DecodeDamage, new_frames: int) -> int:
        held = damage._pending() - new_frames
        if not damage.damaged:
            self.depth, self.seen = max(self.depth, held), self.seen + 1
            return 0
        return max(0, held - self.depth) if self.seen >= self.LEARN else 0


def _lose(damage: DecodeDamage, clock: PresentationClock, count: int) -> None:
    for _ in range(max(0, count)):
        damage.undecodable += 1
        clock.skip()
