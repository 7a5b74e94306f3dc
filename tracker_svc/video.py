"""Video input: PyAV decoding into fixed-size batches of RGB frames, from a file or from bytes
that are still arriving.

    with open_video(path_or_feed) as reader:
        reader.info                      # VideoInfo (frame_count estimated from the container)
        for batch in reader.batches(8):  # FrameBatch: upright RGB frames + index + presentation times
            ...

Pictures are turned upright by the stream's display matrix and stamped with their presentation
times (strictly increasing, also for AVI with B-frames): see mocap_common.media.

Damaged files. Frames the decoder refuses (a few kB of garbage mid-file) are skipped and counted
(`reader.undecodable_frames`, in the call's result and the job's quality report); the frame
indices count only the frames that decoded. When more than MAX_UNDECODABLE_FRACTION (10 %) of the
video's frames cannot be decoded, reading stops with VideoDamagedError: as soon as the
container's own frame count shows it, else at the end. Error messages never carry FFmpeg's text
(error numbers, function names, file paths): that goes to the log.

A `ByteFeed` is a read-only file object that another thread (or an asyncio task through
`asyncio.to_thread`) fills chunk by chunk; reads block until more bytes or the end arrive.
Containers that can be demuxed front to back (Matroska/WebM, MPEG-TS, AVI, MP4 with the index
first or fragmented) are decoded while the bytes arrive. An MP4/MOV whose index (moov) sits at the
end needs seeking, so the bytes are first spooled into a per-call temporary directory that is
removed on every exit path; so is anything unrecognised.
"""

from __future__ import annotations

import itertools
import shutil
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mocap_common.logs import get_logger
from mocap_common.media import DecodeDamage, TimedFrame, presentation_frames, upright_rgb, upright_size
from mocap_common.poses import VideoInfo
from tracker_svc.errors import VideoError

log = get_logger(__name__)

DEFAULT_MAX_BUFFERED = 32 << 20  # bytes a ByteFeed holds before feed() blocks (backpressure)
SNIFF_BYTES = 64 << 10  # how far into the stream the container check may look
SPOOL_CHUNK = 1 << 20
# Low light: BlazePose finds nobody in a frame whose brightest parts are near black (a runner
# filmed at RGB × 0.08, 99th percentile 19 of 255, gives no detection; × 0.15 does). Frames whose
# 99th-percentile channel value is below DARK_LEVEL are scaled up to it, at most MAX_GAIN times,
# as a camera's auto-exposure would; the gain is a continuous function of the level, so
# brightness does not jump between frames as it crosses the threshold.
DARK_LEVEL = 128.0
MAX_GAIN = 8.0
_LEVEL_STRIDE = 8  # the level is read from every 8th row and column
# More than this fraction of a video's frames undecodable and the video is refused (VIDEO_DAMAGED):
# a few damaged kB cost a handful of frames (the decoder resyncs at the next keyframe); past a tenth
# the animation would be more gaps than motion.
MAX_UNDECODABLE_FRACTION = 0.10


class VideoDamagedError(VideoError):
    """More than `limit` of the video's frames could not be decoded."""

    def __init__(self, undecodable: int, total: int, limit: float, *, at_least: bool = False) -> None:
        self.undecodable, self.total, self.limit = undecodable, total, limit
        count = f"at least {undecodable}" if at_least else f"{undecodable}"
        super().__init__(f"{count} of the video's {total} frames could not be decoded (more than the "
                         f"{limit * 100:g} % the tracker accepts); the file is damaged")


class ByteFeed:
    """A blocking, read-only byte stream written by a producer and read by the decoder.

    Producer: `feed(chunk)` (blocks while more than `max_buffered` bytes wait), then `finish()` at
    the end, or `abort(error)` to make the reader raise `error`. Consumer: `read(n)` / `peek(n)`
    block until enough bytes, the end, or an abort. Not seekable.
    """

    def __init__(self, max_buffered: int = DEFAULT_MAX_BUFFERED) -> None:
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._max_buffered = max_buffered
        self._finished = False
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self.bytes_received = 0

    # producer side
    def feed(self, data: bytes, timeout: float | None = None) -> None:
        """Appends a chunk; waits while the buffer is full. Raises TimeoutError after `timeout` s."""
        if not data:
            return
        with self._cond:
            if self._finished:
                raise ValueError("feed() after finish()")
            ready = self._cond.wait_for(
                lambda: self._buffered < self._max_buffered or self._closed or self._error is not None,
                timeout,
            )
            if not ready:
                raise TimeoutError("the decoder did not consume the buffered bytes in time")
            if self._closed or self._error is not None:
                return  # the reader is gone: drop the bytes instead of blocking the producer forever
            self._chunks.append(bytes(data))
            self._buffered += len(data)
            self.bytes_received += len(data)
            self._cond.notify_all()

    def finish(self) -> None:
        """Marks the end of the stream; pending reads return what is left, then b""."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def abort(self, error: BaseException) -> None:
        """Makes every pending and future read raise `error` (e.g. cancellation, upload failure)."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    # consumer side (the file-object protocol PyAV uses)
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1) -> bytes:
        """Returns as soon as any bytes are buffered (like a socket); b"" only at the end."""
        with self._cond:
            self._wait_for(1 if size >= 0 else None)
            return self._take(size)

    def peek(self, size: int) -> bytes:
        """Up to `size` bytes from the current position without consuming them."""
        with self._cond:
            self._wait_for(size)
            return b"".join(self._chunks)[:size]

    def close(self) -> None:
        """The reader is done: releases a producer blocked on a full buffer."""
        with self._cond:
            self._closed = True
            self._chunks.clear()
            self._buffered = 0
            self._cond.notify_all()

    def _wait_for(self, size: int | None) -> None:
        """Waits until `size` bytes are buffered (None: the end), the end, or an abort."""
        def ready() -> bool:
            if self._error is not None or self._finished:
                return True
            return size is not None and self._buffered >= size

        self._cond.wait_for(ready)
        if self._error is not None:
            raise self._error

    def _take(self, size: int) -> bytes:
        if size < 0 or size >= self._buffered:
            data = b"".join(self._chunks)
            self._chunks.clear()
        else:
            parts, need = [], size
            while need:
                chunk = self._chunks.popleft()
                if len(chunk) > need:
                    self._chunks.appendleft(chunk[need:])
                    chunk = chunk[:need]
                parts.append(chunk)
                need -= len(chunk)
            data = b"".join(parts)
        self._buffered -= len(data)
        self._cond.notify_all()
        return data


@dataclass
class FrameBatch:
    """Consecutive decoded frames, upright, in presentation order."""

    rgb: list[np.ndarray]  # each (H, W, 3) uint8, turned as the stream's display matrix says
    index: np.ndarray  # (B,) int64 frame number in presentation order, from 0
    timestamp_s: np.ndarray  # (B,) float64 presentation time from the stream start, strictly increasing

    def __len__(self) -> int:
        return len(self.rgb)


VideoSource = str | Path | ByteFeed


class VideoReader:
    """An open video stream; iterate `batches()` once.

    The first frame is decoded on open: PyAV exposes the display matrix only on decoded frames,
    and `info` must give the upright size before tracking starts.
    """

    def __init__(self, container: av.container.InputContainer, *, streaming: bool, decode_threads: int,
                 max_undecodable_fraction: float = MAX_UNDECODABLE_FRACTION) -> None:
        self._container = container
        self.streaming = streaming  # True when decoding while bytes arrive
        self._stream = container.streams.video[0]
        self._stream.thread_type = "AUTO" if decode_threads != 1 else "SLICE"
        self._stream.codec_context.thread_count = decode_threads
        self._max_undecodable = max_undecodable_fraction
        self._damage = DecodeDamage()
        self._frames = presentation_frames(container, self._stream, self._damage)
        self._first = self._decode_first()
        self.info = self._probe()

    @property
    def undecodable_frames(self) -> int:
        """Frames skipped so far because they did not decode (final once `batches()` has ended)."""
        return self._damage.undecodable

    def _decode_first(self) -> TimedFrame | None:
        try:
            return next(self._frames, None)
        except av.error.FFmpegError as exc:
            log.warning("video unreadable before its first frame", detail=str(exc), error=type(exc).__name__,
                        **self._damage_fields())
            raise VideoError("the video's container is damaged or truncated: "
                             "no frame could be read from it") from exc

    def _probe(self) -> VideoInfo:
        stream = self._stream
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif self._container.duration is not None:
            duration = self._container.duration / av.time_base
        else:
            duration = 0.0
        frames = stream.frames or int(round(duration * float(rate)))
        if self._first is not None:
            width, height = upright_size(self._first.frame)
        else:
            width, height = stream.codec_context.width, stream.codec_context.height
        return VideoInfo(
            width=width,
            height=height,
            fps=float(rate),
            frame_count=frames,
            duration_s=duration,
            container=self._container.format.name,
            codec=stream.codec_context.name,
        )

    def batches(self, batch_size: int, *, brighten_dark: bool = False) -> Iterator[FrameBatch]:
        """Decodes frames in presentation order, `batch_size` at a time (the last may be shorter).

        brighten_dark: scale up frames too dark for the pose models (see DARK_LEVEL); for the
        models' input only, so off by default (an overlay shows the picture as it is)."""
        rgb: list[np.ndarray] = []
        stamps: list[float] = []
        index = 0
        frames = itertools.chain([self._first] if self._first is not None else [], self._frames)
        self._first = None
        try:
            for timed in frames:
                picture = upright_rgb(timed.frame)
                rgb.append(brightened(picture) if brighten_dark else picture)
                stamps.append(timed.timestamp_s)
                if len(rgb) == batch_size:
                    self._check_damage(final=False)
                    yield FrameBatch(rgb, np.arange(index, index + len(rgb), dtype=np.int64), np.array(stamps))
                    index += len(rgb)
                    rgb, stamps = [], []
        except av.error.FFmpegError as exc:
            # The demuxer gave up (the container, not a frame, is damaged), or a decoded picture
            # would not convert: FFmpeg's text (error numbers, function names, paths) is for the log.
            done = index + len(rgb)
            log.warning("video unreadable past a point", frames=done, detail=str(exc), error=type(exc).__name__,
                        **self._damage_fields())
            raise VideoError(f"the file is damaged: reading stopped after {done} frames") from exc
        self._check_damage(final=True)
        if rgb:
            yield FrameBatch(rgb, np.arange(index, index + len(rgb), dtype=np.int64), np.array(stamps))

    def _check_damage(self, *, final: bool) -> None:
        """Raises VideoDamagedError past the limit: at the end on the real total, earlier when
        the container's frame count already shows it. Only MP4/MOV's count is used for that: it is
        the sample table's, never below the real count (AVI's header may cover only its first
        RIFF part, Matroska and MPEG-TS have none)."""
        damage, limit = self._damage, self._max_undecodable
        if not damage.undecodable:
            return
        if final:
            total = damage.frames + damage.undecodable
            log.warning("undecodable frames skipped", undecodable=damage.undecodable, frames=total,
                        **self._damage_fields())
            if damage.undecodable > limit * total:
                raise VideoDamagedError(damage.undecodable, total, limit)
            return
        announced = (self._stream.frames or 0) if self._container.format.name.startswith("mov,") else 0
        if announced and damage.undecodable > limit * max(announced, damage.packets):
            log.warning("too many undecodable frames; stopping early", undecodable=damage.undecodable,
                        announced_frames=announced, **self._damage_fields())
            raise VideoDamagedError(damage.undecodable, max(announced, damage.packets), limit, at_least=True)

    def _damage_fields(self) -> dict[str, object]:
        damage = self._damage
        return {"decoded_frames": damage.frames, "refusals": dict(damage.errors), "recoveries": damage.recoveries,
                "first_error": damage.first_error, "container": self._container.format.name,
                "codec": self._stream.codec_context.name}


def brightened(rgb: np.ndarray) -> np.ndarray:
    """`rgb` scaled so its 99th-percentile channel value reaches DARK_LEVEL (gain ≤ MAX_GAIN);
    the same array when it is bright enough."""
    # A histogram of a sparse grid: a sort-free percentile, ~0.3 ms for a 1080p frame.
    counts = np.bincount(rgb[::_LEVEL_STRIDE, ::_LEVEL_STRIDE].ravel(), minlength=256).cumsum()
    level = float(np.searchsorted(counts, 0.99 * counts[-1]))
    gain = min(MAX_GAIN, DARK_LEVEL / max(level, 1.0))
    if gain <= 1.0:
        return rgb
    table = np.clip(np.arange(256) * gain + 0.5, 0, 255).astype(np.uint8)
    return table[rgb]


@contextmanager
def open_video(
    source: VideoSource, *, spool_dir: Path | str | None = None, decode_threads: int = 0
) -> Iterator[VideoReader]:
    """Opens a file path, or a ByteFeed (streamed when the container allows, else spooled).

    spool_dir: parent of the per-call temporary directory used for spooling (system temp if None).
    decode_threads: FFmpeg decoder threads (0 = FFmpeg's choice).
    Raises VideoError when the input is not a decodable video.
    """
    if isinstance(source, ByteFeed):
        with _open_feed(source, spool_dir, decode_threads) as reader:
            yield reader
        return
    with _open_container(str(source), streaming=False, decode_threads=decode_threads) as reader:
        yield reader


@contextmanager
def _open_feed(feed: ByteFeed, spool_dir: Path | str | None, decode_threads: int) -> Iterator[VideoReader]:
    try:
        if needs_seeking(feed.peek(SNIFF_BYTES)):
            with _spooled(feed, spool_dir) as path:
                with _open_container(str(path), streaming=False, decode_threads=decode_threads) as reader:
                    yield reader
        else:
            with _open_container(feed, streaming=True, decode_threads=decode_threads) as reader:
                yield reader
    finally:
        feed.close()


@contextmanager
def _spooled(feed: ByteFeed, spool_dir: Path | str | None) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mocap-spool-", dir=spool_dir))
    try:
        path = directory / "input"
        with path.open("wb") as out:
            while chunk := feed.read(SPOOL_CHUNK):
                out.write(chunk)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def _open_container(source: str | ByteFeed, *, streaming: bool, decode_threads: int) -> Iterator[VideoReader]:
    try:
        container = av.open(source, mode="r")
    except av.error.FFmpegError as exc:
        # FFmpeg's text names the spool file's path and its own error numbers: log it, say less.
        log.warning("video cannot be opened", detail=str(exc), error=type(exc).__name__)
        raise VideoError("the input is not a video this tracker can read "
                         "(an unknown format, or its header is damaged)") from exc
    try:
        if not container.streams.video:
            raise VideoError("the input has no video stream")
        yield VideoReader(container, streaming=streaming, decode_threads=decode_threads)
    finally:
        container.close()


def needs_seeking(head: bytes) -> bool:
    """Whether a container must be read with seeking (spooled) rather than front to back.

    Matroska/WebM, MPEG-TS and AVI demux sequentially. An ISO-BMFF file (MP4/MOV) streams when its
    moov box (or a fragment, moof) comes before the first mdat. Unknown formats are spooled.
    """
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska / WebM
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return False
    if len(head) >= 377 and head[0] == head[188] == head[376] == 0x47:  # MPEG-TS sync bytes
        return False
    if head[4:8] in (b"ftyp", b"moov", b"free", b"mdat", b"wide", b"skip"):
        return _mp4_needs_seeking(head)
    return True


def _mp4_needs_seeking(head: bytes) -> bool:
    offset = 0
    while offset + 8 <= len(head):
        size, kind = struct.unpack(">I4s", head[offset:offset + 8])
        if kind in (b"moov", b"moof"):
            return False
        if kind == b"mdat":
            return True
        if size == 1 and offset + 16 <= len(head):
            size = struct.unpack(">Q", head[offset + 8:offset + 16])[0]
        if size < 8:
            return True  # box to end of file, or malformed: seek to be safe
        offset += size
    return True  # no moov within the sniffed bytes
