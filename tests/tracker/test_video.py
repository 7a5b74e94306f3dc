"""Decoding from files and from bytes that arrive while decoding; spool cleanup on every path."""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from mocap_common.poses import VideoInfo
from tests import damaged_media
from tests.video_corpus import FFMPEG, X264, Clip, clip, make_clip, reference, require_tools
from tracker_svc.errors import TrackingCancelled, VideoError
from tracker_svc.video import DARK_LEVEL, MAX_GAIN, ByteFeed, brightened, needs_seeking, open_video

CHUNK = 64 << 10


def _digest_frames(source, spool_dir: Path | None = None) -> tuple[str, int, np.ndarray, bool]:
    digest = hashlib.sha256()
    stamps = []
    with open_video(source, spool_dir=spool_dir) as reader:
        streaming = reader.streaming
        for batch in reader.batches(8):
            for rgb in batch.rgb:
                digest.update(rgb.tobytes())
            stamps.extend(batch.timestamp_s)
    return digest.hexdigest(), len(stamps), np.array(stamps), streaming


def _feed_file(feed: ByteFeed, path: Path, delay_s: float = 0.0, stop_after: int | None = None,
               error: BaseException | None = None) -> threading.Thread:
    """Feeds `path` chunk by chunk from another thread (optionally stopping early with an error)."""
    def produce() -> None:
        data = path.read_bytes()
        for i, offset in enumerate(range(0, len(data), CHUNK)):
            if stop_after is not None and i == stop_after:
                if error is not None:
                    feed.abort(error)
                return
            feed.feed(data[offset:offset + CHUNK])
            time.sleep(delay_s)
        feed.finish()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    return thread


def _pts_seconds(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        return np.array([(f.pts - start) * float(stream.time_base) for f in container.decode(stream)])


def test_streaming_decode_matches_file_decode(street_path: Path, tmp_path: Path) -> None:
    expected = _digest_frames(street_path)
    feed = ByteFeed(max_buffered=256 << 10)  # small buffer: the producer really waits on the decoder
    producer = _feed_file(feed, street_path, delay_s=0.002)
    digest, count, stamps, streaming = _digest_frames(feed, spool_dir=tmp_path)
    producer.join(5)
    assert streaming, "an MP4 with its index first decodes while the bytes arrive"
    assert (digest, count) == expected[:2]
    np.testing.assert_allclose(stamps, expected[2])
    assert list(tmp_path.iterdir()) == []  # nothing spooled


def test_moov_at_end_is_spooled_and_cleaned(runner_path: Path, tmp_path: Path) -> None:
    expected = _digest_frames(runner_path)
    feed = ByteFeed()
    producer = _feed_file(feed, runner_path)
    digest, count, _, streaming = _digest_frames(feed, spool_dir=tmp_path)
    producer.join(5)
    assert not streaming
    assert (digest, count) == expected[:2]
    assert list(tmp_path.iterdir()) == []


def test_spool_removed_when_the_upload_fails(runner_path: Path, tmp_path: Path) -> None:
    feed = ByteFeed()
    _feed_file(feed, runner_path, stop_after=10, error=ConnectionError("client went away"))
    with pytest.raises(ConnectionError):
        _digest_frames(feed, spool_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_spool_removed_when_cancelled_mid_upload(runner_path: Path, tmp_path: Path) -> None:
    feed = ByteFeed()
    _feed_file(feed, runner_path, stop_after=10)  # then silence: the reader blocks on more bytes
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            _digest_frames(feed, spool_dir=tmp_path)
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    deadline = time.monotonic() + 5
    while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.iterdir()), "spooling started"
    started = time.monotonic()
    feed.abort(TrackingCancelled("cancelled"))
    consumer.join(5)
    assert time.monotonic() - started < 2.0
    assert failure and isinstance(failure[0], TrackingCancelled)
    assert list(tmp_path.iterdir()) == []


def test_timestamps_follow_pts(runner_path: Path, street_path: Path) -> None:
    for path in (runner_path, street_path):
        _, _, stamps, _ = _digest_frames(path)
        np.testing.assert_allclose(stamps, _pts_seconds(path))
        assert np.all(np.diff(stamps) > 0)


def test_batches_have_fixed_size(street_path: Path) -> None:
    with open_video(street_path) as reader:
        sizes = [len(b) for b in reader.batches(16)]
        assert reader.info.frame_count == 205
    assert sizes == [16] * 12 + [13]


def test_not_a_video(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 5000)
    with pytest.raises(VideoError) as caught:
        with open_video(junk):
            pass
    # FFmpeg's own text names the file's path and its error number: the message does not.
    assert not damaged_media.INTERNALS.search(str(caught.value)), str(caught.value)


def test_damaged_frames_are_skipped_and_counted_while_streaming(tmp_path: Path) -> None:
    """4 kB of garbage mid-file used to end the call after the frames before it, with FFmpeg's
    "[Errno 1094995529] ... 'avcodec_send_packet()'"; now the frames around it decode, in order."""
    clean = damaged_media.runner_clip(tmp_path / "clip.mp4")
    damaged = damaged_media.overwrite_packet(clean, tmp_path / "damaged.mp4")
    feed = ByteFeed()
    producer = _feed_file(feed, damaged)
    with open_video(feed, spool_dir=tmp_path) as reader:
        batches = list(reader.batches(8))
        undecodable = reader.undecodable_frames
    producer.join(5)
    index = np.concatenate([b.index for b in batches])
    stamps = np.concatenate([b.timestamp_s for b in batches])
    assert 1 <= undecodable <= 5 and len(index) + undecodable == damaged_media.FRAMES
    np.testing.assert_array_equal(index, np.arange(len(index)))
    assert np.all(np.diff(stamps) > 0)
    assert set(np.round(stamps, 6)) <= set(np.round(list(damaged_media.pts_seconds(clean).values()), 6))


def test_a_heavily_damaged_video_is_refused_with_a_plain_message(tmp_path: Path) -> None:
    from tracker_svc.video import MAX_UNDECODABLE_FRACTION, VideoDamagedError

    clean = damaged_media.runner_clip(tmp_path / "clip.mp4")
    damaged_media.damage_packets(clean, tmp_path / "heavy.mp4", 0.4)
    with pytest.raises(VideoDamagedError) as caught:
        with open_video(tmp_path / "heavy.mp4") as reader:
            for _ in reader.batches(8):
                pass
    message = str(caught.value)
    assert re.fullmatch(r"(at least )?\d+ of the video's 60 frames could not be decoded \(more than the 10 % "
                        r"the tracker accepts\); the file is damaged", message), message
    assert caught.value.undecodable > MAX_UNDECODABLE_FRACTION * caught.value.total
    assert not damaged_media.INTERNALS.search(message)


def test_container_sniffing() -> None:
    def box(kind: bytes, size: int) -> bytes:
        return size.to_bytes(4, "big") + kind

    assert not needs_seeking(box(b"ftyp", 16) + b"\0" * 8 + box(b"moov", 8) + box(b"mdat", 8))
    assert needs_seeking(box(b"ftyp", 16) + b"\0" * 8 + box(b"mdat", 100) + b"\0" * 92 + box(b"moov", 8))
    assert not needs_seeking(b"\x1a\x45\xdf\xa3" + b"\0" * 100)  # Matroska
    assert not needs_seeking(b"RIFF\0\0\0\0AVI LIST")
    assert not needs_seeking(bytes([0x47] + [0] * 187) * 3)  # MPEG-TS
    assert needs_seeking(b"something else entirely")


def test_byte_feed_backpressure_and_close() -> None:
    feed = ByteFeed(max_buffered=4)
    feed.feed(b"abcd")
    with pytest.raises(TimeoutError):
        feed.feed(b"e", timeout=0.05)  # full until the reader takes some
    assert feed.read(2) == b"ab"
    feed.feed(b"ef", timeout=1)
    feed.finish()
    assert feed.peek(3) == b"cde"
    assert feed.read() == b"cdef"
    assert feed.read(10) == b""


async def test_fed_from_an_asyncio_task(street_path: Path) -> None:
    """The gRPC server's shape: an async task feeds request chunks, decoding runs in a thread."""
    import asyncio

    expected = _digest_frames(street_path)
    feed = ByteFeed(max_buffered=128 << 10)
    data = street_path.read_bytes()

    async def upload() -> None:
        for offset in range(0, len(data), CHUNK):
            await asyncio.to_thread(feed.feed, data[offset:offset + CHUNK])  # may wait: backpressure
        feed.finish()

    uploader = asyncio.create_task(upload())
    digest, count, _, streaming = await asyncio.to_thread(_digest_frames, feed)
    await uploader
    assert streaming and (digest, count) == expected[:2]


def test_variable_frame_rate_uses_pts(street_path: Path, tmp_path: Path) -> None:
    """Frames spaced unevenly in time keep their own timestamps (not index / fps)."""
    vfr = tmp_path / "vfr.mkv"

    def warp(ts: int) -> int:  # monotonic: keeps decode order valid, makes spacing grow over time
        return ts + ts * ts // 50

    with av.open(str(street_path)) as source, av.open(str(vfr), mode="w") as out:
        stream = source.streams.video[0]
        out_stream = out.add_stream_from_template(stream)
        for packet in source.demux(stream):
            if packet.dts is None:
                continue
            packet.pts, packet.dts = warp(packet.pts), warp(packet.dts)
            packet.stream = out_stream
            out.mux(packet)
    _, count, stamps, streaming = _digest_frames(vfr)
    assert count == 205 and streaming is False
    np.testing.assert_allclose(stamps, _pts_seconds(vfr))
    gaps = np.diff(stamps)
    assert gaps[-1] > 3 * gaps[0]  # really variable


# ---- the videos people actually have (clips made with ffmpeg at test time: tests/video_corpus.py)

SMALL_BFRAME_AVI = Clip("avi_h264_bframes", "bframes.avi",
                        (("-i", "{src}", "-frames:v", "24", "-vf", "scale=320:-2", *X264, "-an", "{out}"),),
                        slot_timed=True)


def _stamps_and_shapes(source, spool_dir: Path | None = None) -> tuple[np.ndarray, set[tuple[int, ...]], VideoInfo]:
    stamps, shapes = [], set()
    with open_video(source, spool_dir=spool_dir) as reader:
        for batch in reader.batches(8):
            stamps.extend(batch.timestamp_s)
            shapes.update(rgb.shape for rgb in batch.rgb)
        return np.array(stamps), shapes, reader.info


def test_avi_with_b_frames_has_presentation_timestamps(tmp_path: Path) -> None:
    """AVI stores no pts; libavformat's invented ones come back reordered (0.033, 0.1, 0.133,
    0.067, ...). The frames must take the AVI's frame slots in presentation order instead."""
    path = make_clip(SMALL_BFRAME_AVI, require_tools(), tmp_path)
    expected = reference(path, slot_timed=True).timestamps_s  # ffprobe: the chunks' dts, in order
    from_file, _, _ = _stamps_and_shapes(path)
    feed = ByteFeed(max_buffered=64 << 10)
    producer = _feed_file(feed, path)
    streamed, _, _ = _stamps_and_shapes(feed, spool_dir=tmp_path)  # AVI decodes while it arrives
    producer.join(5)
    for stamps in (from_file, streamed):
        assert np.all(np.diff(stamps) > 0), stamps[:8]
        np.testing.assert_allclose(stamps, expected, atol=1e-9)
        np.testing.assert_allclose(stamps, np.arange(24) / 30, atol=1e-9)  # 30 fps, no gaps


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_phone_video_is_decoded_upright(rotation: int, tmp_path: Path) -> None:
    """A picture coded sideways with a display matrix is tracked as shown: upright, 640×362,
    pixel for pixel what ffmpeg's own autorotating decoder shows."""
    phone = clip(f"phone_rotate_{rotation}")
    path = make_clip(phone, require_tools(phone), tmp_path)
    stamps, shapes, info = _stamps_and_shapes(path)
    assert (info.width, info.height) == phone.upright_size == (640, 362)
    assert shapes == {(362, 640, 3)} and len(stamps) == 45
    with open_video(path) as reader:
        ours = next(iter(reader.batches(1))).rgb[0].astype(np.int16)
    shown = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt",
                            "rgb24", "-"], capture_output=True, check=True).stdout
    ffmpeg_view = np.frombuffer(shown, np.uint8).reshape(362, 640, 3).astype(np.int16)
    assert np.abs(ours - ffmpeg_view).mean() < 2.0  # two FFmpeg versions' scalers: equal up to rounding


def test_dark_frames_are_brightened_for_the_models_only(tmp_path: Path) -> None:
    """A clip at RGB × 0.08 (99th percentile 19 of 255) is scaled up to DARK_LEVEL when asked;
    bright frames are passed through untouched (the same array)."""
    dark = clip("very_dark")
    path = make_clip(dark, require_tools(dark), tmp_path)
    with open_video(path) as reader:
        as_is = next(iter(reader.batches(1))).rgb[0]
    with open_video(path) as reader:
        for_models = next(iter(reader.batches(1, brighten_dark=True))).rgb[0]
    assert np.percentile(as_is, 99) < 25
    assert np.percentile(for_models, 99) == pytest.approx(DARK_LEVEL, abs=MAX_GAIN)
    bright = np.full((64, 64, 3), 200, np.uint8)
    assert brightened(bright) is bright
