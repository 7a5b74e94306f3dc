"""Every hostile upload gets the right status code, reason and BadRequest field, and leaves no
file under the data dir and no row in the store."""

from __future__ import annotations

from pathlib import Path

import av
import grpc
import numpy as np
import pytest

from mocap.v1 import common_pb2, gateway_pb2
from tests.gateway.helpers import Client, chunks, db_rows, header, job_dirs, rpc_error
from tests.media_shapes import write_h264_mp4

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SIZE_LIMIT = 5 * 1024 * 1024  # runner_1080p.mp4 (2.0 MB) and a 4 MiB + 1 chunk fit, 5 MiB + 1 does not
CHUNK_LIMIT = 4 * 1024 * 1024  # the documented most bytes one UploadChunk may carry
RID = "hostile-1"


def _zero_frame_video(tmp: Path) -> bytes:
    path = tmp / "zero.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()  # header and index, no frames
    return path.read_bytes()


def _faststart_cut(runner: bytes, tmp: Path) -> bytes:
    """runner remuxed with its index first, then cut inside the last frame: the index promises
    frames the file no longer has."""
    src, dst = tmp / "in.mp4", tmp / "faststart.mp4"
    src.write_bytes(runner)
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst.read_bytes()[:-3000]


def _audio_only(tmp: Path) -> bytes:
    """An .m4a: an MP4 container with one AAC stream and no picture."""
    path = tmp / "voice.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes()


def _shape(tmp: Path, width: int, height: int, frames: int = 3) -> bytes:
    return write_h264_mp4(tmp / f"shape-{width}x{height}.mp4", width, height, frames=frames).read_bytes()


def _one_big_chunk(size: int) -> list[gateway_pb2.CreateJobRequest]:
    data = bytes(size)
    return [header(data, request_id=RID), gateway_pb2.CreateJobRequest(chunk=gateway_pb2.UploadChunk(offset=0, data=data))]


def _cases(runner: bytes, tmp: Path) -> dict[str, tuple[list[gateway_pb2.CreateJobRequest], grpc.StatusCode, str, str | None]]:
    """name → (messages, code, reason, BadRequest field or None)."""
    def upload(data: bytes, **fields) -> list[gateway_pb2.CreateJobRequest]:
        fields.setdefault("request_id", RID)
        return [header(data, **fields), *chunks(data)]

    def bad_header(**fields) -> list[gateway_pb2.CreateJobRequest]:
        return upload(runner, **fields)

    body = chunks(runner)
    text = b"this is a text file, not a video\n" * 2000
    return {
        "empty stream": ([], INVALID, "EMPTY_UPLOAD", None),
        "no header": (body, INVALID, "HEADER_REQUIRED", "header"),
        "chunk before header": ([body[0], header(runner, request_id=RID), *body], INVALID, "HEADER_REQUIRED", "header"),
        "empty first message": ([gateway_pb2.CreateJobRequest(), *body], INVALID, "HEADER_REQUIRED", "header"),
        "second header": ([header(runner, request_id=RID), body[0], header(runner, request_id=RID), *body[1:]],
                          INVALID, "HEADER_REQUIRED", "header"),
        "fewer bytes than declared": (upload(runner, size=len(runner) + 1000), INVALID, "SIZE_MISMATCH", "header.size_bytes"),
        "more bytes than declared": (upload(runner, size=len(runner) - 1000), INVALID, "SIZE_MISMATCH", "header.size_bytes"),
        "wrong sha256": (upload(runner, sha256="0" * 64), INVALID, "CHECKSUM_MISMATCH", "header.sha256"),
        "malformed sha256": (upload(runner, sha256="xyz"), INVALID, "INVALID_FIELD", "header.sha256"),
        "non-video bytes": (upload(text), INVALID, "NOT_A_VIDEO", "chunk.data"),
        "random bytes": (upload(bytes(range(256)) * 400), INVALID, "NOT_A_VIDEO", "chunk.data"),
        "truncated mp4": (upload(runner[: len(runner) // 2]), INVALID, "NOT_A_VIDEO", "chunk.data"),
        "truncated faststart mp4": (upload(_faststart_cut(runner, tmp)), INVALID, "NOT_A_VIDEO", "chunk.data"),
        "zero-frame video": (upload(_zero_frame_video(tmp)), INVALID, "NO_FRAMES", "chunk.data"),
        "over the size limit": (bad_header(size=SIZE_LIMIT + 1), INVALID, "UPLOAD_TOO_LARGE", "header.size_bytes"),
        "zero size": (bad_header(size=0), INVALID, "INVALID_FIELD", "header.size_bytes"),
        "filename ../../etc/passwd": (bad_header(filename="../../etc/passwd"), INVALID, "INVALID_FIELD", "header.filename"),
        "absolute filename": (bad_header(filename="/etc/passwd"), INVALID, "INVALID_FIELD", "header.filename"),
        "filename with NUL": (bad_header(filename="run\x00ner.mp4"), INVALID, "INVALID_FIELD", "header.filename"),
        "filename 10 kB long": (bad_header(filename="a" * 10_000 + ".mp4"), INVALID, "INVALID_FIELD", "header.filename"),
        "filename ..": (bad_header(filename=".."), INVALID, "INVALID_FIELD", "header.filename"),
        "filename with backslash": (bad_header(filename="..\\..\\boot.ini"), INVALID, "INVALID_FIELD", "header.filename"),
        "empty filename": (bad_header(filename=""), INVALID, "INVALID_FIELD", "header.filename"),
        "unknown output format": (bad_header(options=common_pb2.JobOptions(formats=[1, 99])), INVALID, "INVALID_FIELD",
                                  "header.options.formats[1]"),
        "duplicate output format": (bad_header(options=common_pb2.JobOptions(formats=[1, 1])), INVALID, "INVALID_FIELD",
                                    "header.options.formats[1]"),
        "unknown smoothing preset": (bad_header(options=common_pb2.JobOptions(smoothing=42)), INVALID, "INVALID_FIELD",
                                     "header.options.smoothing"),
        "unknown root motion": (bad_header(options=common_pb2.JobOptions(root_motion=7)), INVALID, "INVALID_FIELD",
                                "header.options.root_motion"),
        "too many persons": (bad_header(options=common_pb2.JobOptions(max_persons=17)), INVALID, "INVALID_FIELD",
                             "header.options.max_persons"),
        "negative persons": (bad_header(options=common_pb2.JobOptions(max_persons=-1)), INVALID, "INVALID_FIELD",
                             "header.options.max_persons"),
        "malformed request_id": (bad_header(request_id="has spaces"), INVALID, "INVALID_FIELD", "header.request_id"),
        "resume without request_id": (bad_header(request_id="", resume_offset=10), INVALID, "INVALID_FIELD",
                                      "header.resume_offset"),
        "resume of an unknown upload": (bad_header(resume_offset=10), grpc.StatusCode.FAILED_PRECONDITION,
                                        "UPLOAD_OFFSET_MISMATCH", None),
        "chunk at the wrong offset": ([header(runner), *chunks(runner)[1:]], grpc.StatusCode.FAILED_PRECONDITION,
                                      "UPLOAD_OFFSET_MISMATCH", None),
        "chunk over the 4 MiB limit": (_one_big_chunk(CHUNK_LIMIT + 1), INVALID, "CHUNK_TOO_LARGE", "chunk.data"),
        "audio only": (upload(_audio_only(tmp)), INVALID, "NOT_A_VIDEO", "chunk.data"),
        "16000x16 sliver": (upload(_shape(tmp, 16000, 16)), INVALID, "UNSUPPORTED_ASPECT_RATIO", "chunk.data"),
        "16x16000 sliver": (upload(_shape(tmp, 16, 16000)), INVALID, "UNSUPPORTED_ASPECT_RATIO", "chunk.data"),
        "frames over the pixel limit": (upload(_shape(tmp, 4096, 2304, frames=1)), INVALID, "RESOLUTION_TOO_HIGH",
                                        "chunk.data"),
        "negative size": (bad_header(size=-5), INVALID, "INVALID_FIELD", "header.size_bytes"),
        "negative resume offset": (bad_header(resume_offset=-1), INVALID, "INVALID_FIELD", "header.resume_offset"),
        "request_id 129 characters": (bad_header(request_id="r" * 129), INVALID, "INVALID_FIELD", "header.request_id"),
        "filename with newline": (bad_header(filename="run\nner.mp4"), INVALID, "INVALID_FIELD", "header.filename"),
    }


CASE_NAMES = [
    "empty stream", "no header", "chunk before header", "empty first message", "second header",
    "fewer bytes than declared", "more bytes than declared", "wrong sha256", "malformed sha256", "non-video bytes",
    "random bytes", "truncated mp4", "truncated faststart mp4", "zero-frame video", "over the size limit", "zero size",
    "filename ../../etc/passwd", "absolute filename", "filename with NUL", "filename 10 kB long", "filename ..",
    "filename with backslash", "empty filename", "unknown output format", "duplicate output format",
    "unknown smoothing preset", "unknown root motion", "too many persons", "negative persons", "malformed request_id",
    "resume without request_id", "resume of an unknown upload", "chunk at the wrong offset",
    "chunk over the 4 MiB limit", "audio only", "16000x16 sliver", "16x16000 sliver", "frames over the pixel limit",
    "negative size", "negative resume offset", "request_id 129 characters", "filename with newline",
]


@pytest.fixture
async def hostile_client(start_gateway):
    gateway = await start_gateway(max_upload_bytes=SIZE_LIMIT)
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        yield client


def test_every_case_is_listed(runner_bytes, tmp_path):
    assert sorted(_cases(runner_bytes, tmp_path)) == sorted(CASE_NAMES)
    assert len(CASE_NAMES) >= 40


@pytest.mark.parametrize("case", CASE_NAMES)
async def test_hostile_upload_is_refused_and_leaves_nothing(case, hostile_client, runner_bytes, tmp_path, data_dir):
    media = tmp_path / "media"
    media.mkdir()
    messages, code, reason, field = _cases(runner_bytes, media)[case]

    err = await rpc_error(hostile_client.send(messages))

    assert (err.code, err.reason) == (code, reason), str(err)
    assert err.domain == "mocapmesh.dev" and err.message
    if field is not None:
        assert field in [v.field for v in err.violations], err.violations
    assert str(data_dir) not in err.message and "/tmp" not in err.message  # no server paths leak
    assert job_dirs(data_dir) == []
    assert db_rows(data_dir) == {"jobs": 0, "uploads": 0, "events": 0, "artifacts": 0}
    missing = await rpc_error(hostile_client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id=RID)))
    assert missing.code == grpc.StatusCode.NOT_FOUND
