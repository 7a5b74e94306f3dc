"""Reads and validates an Export request stream: header, pose chunks, then video bytes.

Order rules: the first message is the header and only the first; pose chunks come before any
video chunk; video chunks only when the header asks for a preview, and exactly
`video_size_bytes` of them (spooled to the call's directory, never held in memory). Every
violation raises InvalidArgument with a BadRequest field violation naming the offending field.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter_svc.export import FORMAT_NAMES, ExportInput, ExportOptions
from mocap.v1 import common_pb2, exporter_pb2
from mocap_common.errors import FieldViolation, InvalidArgument
from mocap_common.posecodec import PoseTrackAssembler, video_from_proto

NAME_STEM = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_STEM = "take"
VIDEO_FILE = "input-video"
MAX_WORLD_M = 1000.0


@dataclass(frozen=True)
class IntakeLimits:
    max_video_bytes: int
    max_pose_frames: int
    max_tracks: int


def _invalid(field: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
    return InvalidArgument(f"invalid export request: {field} {description}", reason=reason,
                           violations=[FieldViolation(field, description)])


def parse_header(header: exporter_pb2.ExportHeader, limits: IntakeLimits) -> ExportOptions:
    """Validates the header and fills in defaults."""
    formats: list[str] = []
    for value in header.formats:
        name = FORMAT_NAMES.get(value)
        if name is None:
            raise _invalid("header.formats", f"unknown or unspecified format {value}")
        if name in formats:
            raise _invalid("header.formats", f"duplicate format {name.upper()}")
        formats.append(name)
    if not formats:
        formats = ["bvh", "fbx", "glb"]
    stem = header.name_stem or DEFAULT_STEM
    if not NAME_STEM.match(stem):
        raise _invalid("header.name_stem", "use 1-64 letters, digits, '-' or '_'")
    if header.root_motion not in common_pb2.RootMotion.values():
        raise _invalid("header.root_motion", f"unknown root motion {header.root_motion}")
    hfov = header.camera_hfov_deg
    if not (hfov == 0 or (math.isfinite(hfov) and 0 < hfov < 180)):
        raise _invalid("header.camera_hfov_deg", "must be 0 (default) or between 0 and 180 degrees")
    video = header.video
    if video.fps < 0 or not math.isfinite(video.fps):
        raise _invalid("header.video.fps", "must be a finite number ≥ 0")
    if video.width < 0 or video.height < 0:
        raise _invalid("header.video", "width and height must be ≥ 0")
    if header.preview:
        if header.video_size_bytes <= 0:
            raise _invalid("header.video_size_bytes", "must be > 0 when preview is set")
        if header.video_size_bytes > limits.max_video_bytes:
            raise _invalid("header.video_size_bytes", f"exceeds the limit of {limits.max_video_bytes} bytes",
                           reason="UPLOAD_TOO_LARGE")
    elif header.video_size_bytes != 0:
        raise _invalid("header.video_size_bytes", "must be 0 when preview is not set")
    return ExportOptions(
        formats=tuple(formats),
        preview=header.preview,
        in_place=header.root_motion == common_pb2.ROOT_MOTION_IN_PLACE,
        foot_locking=not header.disable_foot_locking,
        name_stem=stem,
        camera_hfov_deg=hfov or None,
    )


async def read_export_request(messages: AsyncIterator[exporter_pb2.ExportRequest], workdir: Path,
                              limits: IntakeLimits) -> tuple[ExportInput, ExportOptions]:
    """Consumes the whole request stream (until the client half-closes)."""
    header: exporter_pb2.ExportHeader | None = None
    options: ExportOptions | None = None
    assembler = PoseTrackAssembler()
    video_path = workdir / VIDEO_FILE
    video_file = None
    received = 0
    index = 0
    try:
        async for message in messages:
            part = message.WhichOneof("part")
            if index == 0:
                if part != "header":
                    raise _invalid("header", "the first message must be the header", reason="HEADER_REQUIRED")
                header = message.header
                options = parse_header(header, limits)
                if options.preview:
                    video_file = open(video_path, "wb")  # noqa: SIM115 - closed in finally
            elif part == "header":
                raise _invalid("header", "only the first message may be a header", reason="HEADER_REQUIRED")
            elif part == "poses":
                if received:
                    raise _invalid(f"messages[{index}].poses", "pose chunks must come before the video bytes")
                assembler.add_chunk(message.poses, where=f"messages[{index}].poses")
                if assembler.frames > limits.max_pose_frames:
                    raise _invalid("poses", f"more than {limits.max_pose_frames} frames in all")
            elif part == "video_chunk":
                if video_file is None:
                    raise _invalid(f"messages[{index}].video_chunk", "video bytes are only accepted with preview set")
                received += len(message.video_chunk)
                assert header is not None
                if received > header.video_size_bytes:
                    raise _invalid("video_chunk", f"more bytes than video_size_bytes ({header.video_size_bytes})",
                                   reason="SIZE_MISMATCH")
                video_file.write(message.video_chunk)
            else:
                raise _invalid(f"messages[{index}]", "empty message")
            index += 1
    finally:
        if video_file is not None:
            video_file.close()
    if header is None or options is None:
        raise _invalid("header", "the request stream was empty", reason="EMPTY_UPLOAD")
    if options.preview and received != header.video_size_bytes:
        raise _invalid("video_chunk", f"received {received} video bytes, header says {header.video_size_bytes}",
                       reason="SIZE_MISMATCH")
    tracks = assembler.tracks()
    if not tracks:
        raise _invalid("poses", "no pose frames were sent", reason="BAD_TRACKS")
    if len(tracks) > limits.max_tracks:
        raise _invalid("poses", f"more than {limits.max_tracks} tracks", reason="BAD_TRACKS")
    for track in tracks:
        where = f"poses.tracks[track_id={track.track_id}]"
        if not np.all(np.isfinite(track.world)) or not np.all(np.abs(track.world) < MAX_WORLD_M):
            raise _invalid(f"{where}.world_landmarks", f"must be finite, within ±{MAX_WORLD_M:g} m", reason="BAD_TRACKS")
        if not np.all(np.isfinite(track.image)):
            raise _invalid(f"{where}.image_landmarks", "must be finite", reason="BAD_TRACKS")
    return ExportInput(tracks=tracks, video=video_from_proto(header.video),
                       video_path=video_path if options.preview else None, job=header.job), options
