"""ExporterService through gRPC, with the exporter as a real child process (`python -m
exporter_svc`) and a real Blender child: files with checksums, one armature per person, the
preview, quality figures, and bad input refused with nothing left behind."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import av
import grpc
import numpy as np
import pytest

from mocap.v1 import common_pb2, exporter_pb2, exporter_pb2_grpc
from mocap_common.posecodec import chunk_tracks, video_to_proto
from mocap_common.poses import PoseTrack, VideoInfo
from mocap_common.rpc_errors import describe_rpc_error
from tests.exporter.conftest import blender_probe, cmu_track, validate_gltf, video_info
from tests.support import STREET_AVI, ServiceProcess, shared_file

MIB = 1024 * 1024


@dataclass
class Received:
    progress: list[tuple[str, float]] = field(default_factory=list)
    files: dict[str, exporter_pb2.ExportedFile] = field(default_factory=dict)
    data: dict[str, bytes] = field(default_factory=dict)
    chunk_sizes: list[int] = field(default_factory=list)
    result: exporter_pb2.ExportResult | None = None


def header(video: VideoInfo, **fields) -> exporter_pb2.ExportRequest:
    return exporter_pb2.ExportRequest(header=exporter_pb2.ExportHeader(video=video_to_proto(video), **fields))


def requests(head: exporter_pb2.ExportRequest, tracks: list[PoseTrack], video: bytes = b"", frames_per_chunk: int = 64):
    yield head
    for chunk in chunk_tracks(tracks, frames_per_chunk):
        yield exporter_pb2.ExportRequest(poses=chunk)
    for start in range(0, len(video), MIB):
        yield exporter_pb2.ExportRequest(video_chunk=video[start:start + MIB])


async def export(address: str, messages, timeout: float = 240) -> Received:
    got = Received()
    current = None
    chunks: list[bytes] = []
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * MIB)]) as channel:
        stub = exporter_pb2_grpc.ExporterServiceStub(channel)
        async for response in stub.Export(messages, timeout=timeout):
            kind = response.WhichOneof("event")
            if kind == "progress":
                got.progress.append((response.progress.step, response.progress.fraction))
            elif kind == "file":
                if current is not None:
                    got.data[current.filename] = b"".join(chunks)
                current, chunks = response.file, []
                got.files[current.filename] = current
            elif kind == "chunk":
                assert current is not None
                assert response.chunk.offset == sum(len(c) for c in chunks)  # contiguous, in order
                chunks.append(response.chunk.data)
                got.chunk_sizes.append(len(response.chunk.data))
            else:
                got.result = response.result
    if current is not None:
        got.data[current.filename] = b"".join(chunks)
    return got


def work_dir_entries(service) -> list[str]:
    return sorted(p.name for p in service.work_dir.iterdir()) if service.work_dir.exists() else []


async def test_export_streams_every_file_with_checksums_and_quality(exporter_factory, tmp_path):
    service = exporter_factory()
    track = cmu_track("cmu_131_01", step=4, frames=150)  # 5 s at 30 fps
    got = await export(service.address, requests(header(video_info(150), name_stem="walk_01"), [track]))

    assert set(got.files) == {"walk_01-person-1.bvh", "walk_01.fbx", "walk_01.glb"}
    kinds = {name: (f.kind, f.track_id, f.media_type) for name, f in got.files.items()}
    assert kinds["walk_01-person-1.bvh"] == (common_pb2.ARTIFACT_KIND_BVH, 1, "text/plain")
    assert kinds["walk_01.fbx"] == (common_pb2.ARTIFACT_KIND_FBX, 0, "application/octet-stream")
    assert kinds["walk_01.glb"] == (common_pb2.ARTIFACT_KIND_GLB, 0, "model/gltf-binary")
    for name, announced in got.files.items():
        data = got.data[name]
        assert announced.size_bytes == len(data) > 0
        assert announced.sha256 == hashlib.sha256(data).hexdigest()
    assert max(got.chunk_sizes) <= MIB
    assert got.data["walk_01-person-1.bvh"].startswith(b"HIERARCHY\nROOT Hips")
    assert got.data["walk_01.glb"][:4] == b"glTF"
    assert got.data["walk_01.fbx"].startswith(b"Kaydara FBX Binary")

    fractions = [f for _, f in got.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [s for s, _ in got.progress][:2] == ["solve", "bvh"]

    result = got.result
    assert result is not None and result.animation_fps == 30.0
    assert result.blender_seconds > result.blender_startup_seconds > 0
    (quality,) = result.quality
    assert quality.track_id == 1 and quality.frames_tracked == 150 and quality.frames_solved_fraction == 1.0
    assert 0.5 < quality.foot_contact_fraction <= 1.0
    assert len(quality.joints) == 33 and quality.joints[15].name == "left_wrist" and quality.joints[15].coverage == 1.0
    (solve,) = result.solve
    assert solve.exported and solve.frames == 150 and 0 < solve.mean_fit_error_mm < 30
    assert solve.foot_skate_unlocked_mm > quality.foot_skate_mm
    assert work_dir_entries(service) == []  # the call's temporary directory is gone


async def test_every_person_gets_an_armature_and_a_bvh(exporter_factory, tmp_path):
    service = exporter_factory()
    first = cmu_track("cmu_131_01", track_id=1, step=4, frames=90)
    second = cmu_track("cmu_131_02", track_id=4, step=4, frames=60, first_frame=20, shift_m=(1.2, 0.0, 0.5))
    got = await export(service.address, requests(header(video_info(110), name_stem="street",
                                                        formats=[common_pb2.OUTPUT_FORMAT_GLB, common_pb2.OUTPUT_FORMAT_BVH]),
                                                 [first, second]))
    assert set(got.files) == {"street-person-1.bvh", "street-person-4.bvh", "street.glb"}
    assert [q.track_id for q in got.result.quality] == [1, 4]
    glb = tmp_path / "street.glb"
    glb.write_bytes(got.data["street.glb"])
    assert validate_gltf(glb)["numErrors"] == 0
    probe = blender_probe("glb", glb, 30.0, tmp_path)
    assert sorted(probe.armatures) == ["person-1", "person-4"]
    # Person 4 appears at frame 20 of the video: its BVH covers its own 60 frames.
    assert b"Frames: 60\n" in got.data["street-person-4.bvh"]
    assert work_dir_entries(service) == []


async def test_preview_draws_each_person_over_the_video(exporter_factory, tmp_path):
    from mocap_common.overlay import track_color

    service = exporter_factory()
    video = shared_file(STREET_AVI).read_bytes()
    with av.open(str(STREET_AVI)) as container:
        stream = container.streams.video[0]
        width, height, frames = stream.codec_context.width, stream.codec_context.height, stream.frames
    info = VideoInfo(width=width, height=height, fps=50.0, frame_count=frames, duration_s=frames / 50.0)
    tracks = [cmu_track("cmu_131_01", track_id=1, frames=frames, width=width, height=height),
              cmu_track("cmu_131_02", track_id=2, frames=frames, width=width, height=height, shift_m=(1.0, 0, 0))]
    got = await export(service.address, requests(header(info, name_stem="street", preview=True, video_size_bytes=len(video),
                                                        formats=[common_pb2.OUTPUT_FORMAT_BVH]),
                                                 tracks, video))
    assert "street-preview.mp4" in got.files
    assert got.files["street-preview.mp4"].kind == common_pb2.ARTIFACT_KIND_PREVIEW
    path = tmp_path / "preview.mp4"
    path.write_bytes(got.data["street-preview.mp4"])
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames
    for track in tracks:  # the left shoulder of each person, in its own colour (lossy video: ±40)
        x, y = np.rint(track.image[0, 11, :2]).astype(int)
        colour = decoded[0][y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(axis=0)
        assert np.abs(colour - np.array(track_color(track.track_id))).max() < 40, (track.track_id, colour)
    assert work_dir_entries(service) == []


BAD_REQUESTS = {
    "first message not a header": (lambda t, v: iter([exporter_pb2.ExportRequest(poses=next(chunk_tracks([t])))]),
                                   "HEADER_REQUIRED", "header"),
    "second header": (lambda t, v: iter([header(v), header(v)]), "HEADER_REQUIRED", "header"),
    "duplicate format": (lambda t, v: requests(header(v, formats=[1, 1]), [t]), "INVALID_FIELD", "header.formats"),
    "unknown format": (lambda t, v: requests(header(v, formats=[9]), [t]), "INVALID_FIELD", "header.formats"),
    "unsafe name stem": (lambda t, v: requests(header(v, name_stem="../etc"), [t]), "INVALID_FIELD", "header.name_stem"),
    "video bytes without preview": (lambda t, v: requests(header(v), [t], b"abc"), "INVALID_FIELD", "messages[2].video_chunk"),
    "video size without preview": (lambda t, v: requests(header(v, video_size_bytes=3), [t]), "INVALID_FIELD",
                                   "header.video_size_bytes"),
    "video shorter than declared": (lambda t, v: requests(header(v, preview=True, video_size_bytes=10), [t], b"abc"),
                                    "SIZE_MISMATCH", "video_chunk"),
    "no poses": (lambda t, v: iter([header(v)]), "BAD_TRACKS", "poses"),
    "wrong landmark count": (lambda t, v: iter([header(v), exporter_pb2.ExportRequest(poses=common_pb2.PoseChunk(
        tracks=[common_pb2.PoseTrack(track_id=1, frames=[common_pb2.PoseFrame(world_landmarks=[0.0] * 5)])]))]),
        "BAD_TRACKS", "messages[1].poses.tracks[0].frames[0].image_landmarks"),
    "not a video": (lambda t, v: requests(header(v, preview=True, video_size_bytes=4096), [t], b"\x00" * 4096),
                    "NOT_A_VIDEO", "video_chunk"),
}


@pytest.fixture(scope="module")
def shared_exporter(tmp_path_factory):
    work = tmp_path_factory.mktemp("shared-exporter")
    service = ServiceProcess("exporter_svc", ["--work-dir", str(work / "work"), "--log-format", "console"],
                             log_path=work / "exporter.log")
    service.work_dir = work / "work"  # type: ignore[attr-defined]
    with service:
        yield service


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_input_is_refused_with_a_field_violation_and_nothing_left(case, shared_exporter):
    service = shared_exporter
    track = cmu_track("cmu_131_01", frames=20)
    make, reason, field_name = BAD_REQUESTS[case]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await export(service.address, make(track, video_info(20)))
    details = describe_rpc_error(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.reason == reason
    assert [v.field for v in details.violations] == [field_name]
    assert work_dir_entries(service) == []


async def test_nan_landmarks_are_refused(exporter_factory):
    service = exporter_factory()
    track = cmu_track("cmu_131_01", frames=20)
    track.world[3, 7, 1] = np.nan
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await export(service.address, requests(header(video_info(20)), [track]))
    details = describe_rpc_error(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.reason == "BAD_TRACKS"
    assert details.violations[0].field == "poses.tracks[track_id=1].world_landmarks"
    assert work_dir_entries(service) == []


async def test_a_track_that_cannot_be_solved_fails_precondition(exporter_factory):
    service = exporter_factory()
    track = cmu_track("cmu_131_01", frames=20)
    track.image[..., 3] = 0.1  # never visible
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await export(service.address, requests(header(video_info(20), formats=[common_pb2.OUTPUT_FORMAT_BVH]), [track]))
    details = describe_rpc_error(caught.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION and details.reason == "UNSOLVABLE"
    assert "track 1" in details.message
    assert work_dir_entries(service) == []
