"""Pose tracks between numpy (`mocap_common.poses`) and the wire (`mocap.v1.PoseTrack`).

Streaming RPCs send tracks as `PoseChunk`s of at most `frames_per_chunk` frames; the receiver
joins pieces with `PoseTrackAssembler`. Malformed input raises `InvalidArgument` (BAD_TRACKS)
naming the offending field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from mocap.v1 import common_pb2
from mocap_common.errors import FieldViolation, InvalidArgument
from mocap_common.poses import IMAGE_CHANNELS, NUM_LANDMARKS, WORLD_CHANNELS, PoseTrack, PoseTrackSet, VideoInfo

_IMAGE_FLOATS = NUM_LANDMARKS * IMAGE_CHANNELS
_WORLD_FLOATS = NUM_LANDMARKS * WORLD_CHANNELS
DEFAULT_FRAMES_PER_CHUNK = 512


def video_to_proto(video: VideoInfo) -> common_pb2.VideoInfo:
    return common_pb2.VideoInfo(
        container=video.container,
        codec=video.codec,
        width=video.width,
        height=video.height,
        frame_count=video.frame_count,
        fps=video.fps,
        duration_seconds=video.duration_s,
    )


def video_from_proto(msg: common_pb2.VideoInfo) -> VideoInfo:
    return VideoInfo(
        width=msg.width,
        height=msg.height,
        fps=msg.fps,
        frame_count=msg.frame_count,
        duration_s=msg.duration_seconds,
        container=msg.container,
        codec=msg.codec,
    )


def track_to_proto(track: PoseTrack, start: int = 0, stop: int | None = None) -> common_pb2.PoseTrack:
    """Frames [start, stop) of `track` as a wire PoseTrack."""
    stop = len(track) if stop is None else stop
    image = track.image[start:stop].reshape(-1, _IMAGE_FLOATS)
    world = track.world[start:stop].reshape(-1, _WORLD_FLOATS)
    frames = []
    for i in range(stop - start):
        j = start + i
        x0, y0, x1, y1 = (float(v) for v in track.bbox[j])
        frames.append(
            common_pb2.PoseFrame(
                frame_index=int(track.frame_index[j]),
                timestamp_seconds=float(track.timestamp_s[j]),
                image_landmarks=image[i].tolist(),
                world_landmarks=world[i].tolist(),
                bbox=common_pb2.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1),
                score=float(track.score[j]),
            )
        )
    return common_pb2.PoseTrack(track_id=track.track_id, frames=frames)


def track_from_proto(msg: common_pb2.PoseTrack, where: str = "tracks") -> PoseTrack:
    """Decodes and validates a wire PoseTrack."""
    n = len(msg.frames)
    if msg.track_id <= 0:
        raise _bad(f"{where}.track_id", "must be a positive integer")
    image = np.empty((n, _IMAGE_FLOATS), np.float32)
    world = np.empty((n, _WORLD_FLOATS), np.float32)
    frame_index = np.empty((n,), np.int64)
    timestamps = np.empty((n,), np.float64)
    bbox = np.empty((n, 4), np.float32)
    score = np.empty((n,), np.float32)
    for i, frame in enumerate(msg.frames):
        if len(frame.image_landmarks) != _IMAGE_FLOATS:
            raise _bad(f"{where}.frames[{i}].image_landmarks", f"must hold {_IMAGE_FLOATS} floats (33 × 5)")
        if len(frame.world_landmarks) != _WORLD_FLOATS:
            raise _bad(f"{where}.frames[{i}].world_landmarks", f"must hold {_WORLD_FLOATS} floats (33 × 3)")
        image[i] = frame.image_landmarks
        world[i] = frame.world_landmarks
        frame_index[i] = frame.frame_index
        timestamps[i] = frame.timestamp_seconds
        b = frame.bbox
        bbox[i] = (b.x_min, b.y_min, b.x_max, b.y_max)
        score[i] = frame.score
    if n > 1 and np.any(np.diff(frame_index) <= 0):
        raise _bad(f"{where}.frames", "frame_index must be strictly increasing")
    if n > 1 and np.any(np.diff(timestamps) <= 0):
        raise _bad(f"{where}.frames", "timestamp_seconds must be strictly increasing")
    if not (np.all(np.isfinite(timestamps)) and np.all(np.isfinite(bbox)) and np.all(np.isfinite(score))):
        raise _bad(f"{where}.frames", "timestamps, boxes and scores must be finite")
    return PoseTrack(
        track_id=msg.track_id,
        frame_index=frame_index,
        timestamp_s=timestamps,
        image=image.reshape(n, NUM_LANDMARKS, IMAGE_CHANNELS),
        world=world.reshape(n, NUM_LANDMARKS, WORLD_CHANNELS),
        bbox=bbox,
        score=score,
    )


def track_set_to_proto(tracks: PoseTrackSet) -> common_pb2.PoseTrackSet:
    return common_pb2.PoseTrackSet(
        video=video_to_proto(tracks.video),
        tracks=[track_to_proto(t) for t in sorted(tracks.tracks, key=lambda t: t.track_id)],
    )


def track_set_from_proto(msg: common_pb2.PoseTrackSet, where: str = "tracks") -> PoseTrackSet:
    seen: set[int] = set()
    tracks = []
    for i, track in enumerate(msg.tracks):
        if track.track_id in seen:
            raise _bad(f"{where}.tracks[{i}].track_id", f"duplicate track_id {track.track_id}")
        seen.add(track.track_id)
        tracks.append(track_from_proto(track, f"{where}.tracks[{i}]"))
    return PoseTrackSet(video=video_from_proto(msg.video), tracks=tracks)


def chunk_tracks(tracks: Iterable[PoseTrack], frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK) -> Iterator[common_pb2.PoseChunk]:
    """Splits tracks into PoseChunks of at most `frames_per_chunk` frames in all."""
    pending: list[common_pb2.PoseTrack] = []
    room = frames_per_chunk
    for track in tracks:
        start = 0
        while start < len(track):
            stop = min(len(track), start + room)
            pending.append(track_to_proto(track, start, stop))
            room -= stop - start
            start = stop
            if room == 0:
                yield common_pb2.PoseChunk(tracks=pending)
                pending, room = [], frames_per_chunk
    if pending:
        yield common_pb2.PoseChunk(tracks=pending)


class PoseTrackAssembler:
    """Joins streamed track pieces back into whole tracks, checking frame order per track."""

    def __init__(self) -> None:
        self._pieces: dict[int, list[PoseTrack]] = {}
        self._last_frame: dict[int, int] = {}
        self.frames = 0

    def add_chunk(self, chunk: common_pb2.PoseChunk, where: str = "poses") -> None:
        for i, msg in enumerate(chunk.tracks):
            piece = track_from_proto(msg, f"{where}.tracks[{i}]")
            if len(piece) == 0:
                continue
            last = self._last_frame.get(piece.track_id, -1)
            if piece.frame_index[0] <= last:
                raise _bad(f"{where}.tracks[{i}]", f"track {piece.track_id} pieces are out of frame order")
            self._last_frame[piece.track_id] = int(piece.frame_index[-1])
            self._pieces.setdefault(piece.track_id, []).append(piece)
            self.frames += len(piece)

    def tracks(self) -> list[PoseTrack]:
        return [PoseTrack.concatenate(self._pieces[k]) for k in sorted(self._pieces)]


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"malformed pose tracks: {field} {description}", reason="BAD_TRACKS",
                           violations=[FieldViolation(field, description)])
