"""Fake stage services for the gateway's tests: real gRPC servers (in threads of the test
process) speaking TrackerService / SmootherService / ExporterService with tiny plausible outputs,
and knobs to hang, fail or be absent. The real stages are other services' business; these prove
the gateway drives *any* correct implementation of the protos.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np

from mocap.v1 import (
    common_pb2,
    exporter_pb2,
    exporter_pb2_grpc,
    smoother_pb2,
    smoother_pb2_grpc,
    tracker_pb2,
    tracker_pb2_grpc,
)
from mocap_common.errors import FailedPrecondition, InvalidArgument
from mocap_common.posecodec import PoseTrackAssembler, chunk_tracks, track_set_from_proto, track_set_to_proto, video_from_proto
from mocap_common.poses import PoseTrack, PoseTrackSet, VideoInfo
from mocap_common.rpc_errors import to_grpc_status
from tests.support import free_port


@dataclass
class Knobs:
    """What a fake does on its next calls, and what it saw."""

    mode: str = "ok"  # ok | hang | fail | no_person | corrupt | chatty (tracker: 2000 progress messages)
    gate: threading.Event = field(default_factory=lambda: _set(threading.Event()))  # tracker, exporter wait for it mid-call
    calls: int = 0
    bytes_received: int = 0
    started: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)  # waiting at the gate, having responded


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event


def _wait_at_gate(context: grpc.ServicerContext, knobs: Knobs) -> bool:
    """Waits mid-call until knobs.gate is set (no wait by default); False when the call ended
    meanwhile (cancelled, or the server stopped under it)."""
    knobs.paused.set()
    while not knobs.gate.wait(0.02):
        if not context.is_active():
            return False
    return True


def _hang_until_cancelled(context: grpc.ServicerContext, knobs: Knobs, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while context.is_active() and time.monotonic() < deadline:
        time.sleep(0.02)


def _note_cancel(context: grpc.ServicerContext, knobs: Knobs) -> dict[str, bool]:
    """Sets knobs.cancelled when the call ends without the servicer ending it (the client
    cancelled, or its deadline passed). The servicer sets ended["self"] before it finishes or aborts."""
    ended = {"self": False}
    context.add_callback(lambda: None if ended["self"] else knobs.cancelled.set())
    return ended


def fake_tracks(frames: int, persons: int = 1, fps: float = 30.0) -> list[PoseTrack]:
    rng = np.random.default_rng(7)
    tracks = []
    for person in range(1, persons + 1):
        image = np.zeros((frames, 33, 5), np.float32)
        image[:, :, 0] = rng.uniform(100, 900, (frames, 33))
        image[:, :, 1] = rng.uniform(100, 900, (frames, 33))
        image[:, :, 3:] = 0.9
        tracks.append(PoseTrack(
            track_id=person,
            frame_index=np.arange(frames, dtype=np.int64),
            timestamp_s=np.arange(frames, dtype=np.float64) / fps,
            image=image,
            world=rng.normal(0, 0.3, (frames, 33, 3)).astype(np.float32),
            bbox=np.tile(np.array([100, 100, 900, 900], np.float32), (frames, 1)),
            score=np.full(frames, 0.95, np.float32),
        ))
    return tracks


class FakeTracker(tracker_pb2_grpc.TrackerServiceServicer):
    def __init__(self) -> None:
        self.knobs = Knobs()
        self.headers: list[tracker_pb2.TrackHeader] = []
        self.digest = ""

    def Track(self, request_iterator, context):
        k = self.knobs
        k.calls += 1
        ended = _note_cancel(context, k)
        k.started.set()
        digest, header = hashlib.sha256(), None
        for request in request_iterator:
            if request.WhichOneof("part") == "header":
                header = request.header
                self.headers.append(header)
            else:
                digest.update(request.chunk)
                k.bytes_received += len(request.chunk)
        self.digest = digest.hexdigest()
        frames = (header.frame_count if header else 0) or 10
        yield tracker_pb2.TrackResponse(progress=tracker_pb2.TrackProgress(frames_done=frames // 2, frames_total=frames))
        if not _wait_at_gate(context, k):
            return
        if k.mode == "chatty":
            for i in range(2000):
                yield tracker_pb2.TrackResponse(progress=tracker_pb2.TrackProgress(frames_done=i % frames, frames_total=frames))
        if k.mode == "hang":
            _hang_until_cancelled(context, k)
            return
        if k.mode == "fail":
            ended["self"] = True
            context.abort_with_status(to_grpc_status(InvalidArgument(
                "could not decode frame 12 of /var/lib/tracker/spool/abc.mp4", reason="DECODE_FAILED")))
        tracks = [] if k.mode == "no_person" else fake_tracks(frames)
        for chunk in chunk_tracks(tracks, 64):
            yield tracker_pb2.TrackResponse(poses=chunk)
        yield tracker_pb2.TrackResponse(progress=tracker_pb2.TrackProgress(frames_done=frames, frames_total=frames))
        yield tracker_pb2.TrackResponse(result=tracker_pb2.TrackResult(
            video=common_pb2.VideoInfo(width=1920, height=1088, frame_count=frames, fps=30.0, duration_seconds=frames / 30),
            track_count=len(tracks), device="cpu:0"))
        ended["self"] = True
        k.finished.set()


def _metrics(tracks: PoseTrackSet) -> list[smoother_pb2.SmoothingMetrics]:
    return [smoother_pb2.SmoothingMetrics(track_id=t.track_id, jitter_before_mm=12.0, jitter_after_mm=3.0,
                                          mean_displacement_mm=4.0, joint_coverage=[1.0] * 33) for t in tracks.tracks]


class FakeSmoother(smoother_pb2_grpc.SmootherServiceServicer):
    def __init__(self) -> None:
        self.knobs = Knobs()
        self.stream_calls = 0

    def _maybe_misbehave(self, context, ended: dict[str, bool]) -> None:
        if self.knobs.mode == "hang":
            _hang_until_cancelled(context, self.knobs)
        elif self.knobs.mode == "fail":
            ended["self"] = True
            context.abort_with_status(to_grpc_status(InvalidArgument("track 1 has 3 landmarks", reason="BAD_TRACKS")))

    def Smooth(self, request, context):
        self.knobs.calls += 1
        ended = _note_cancel(context, self.knobs)
        self.knobs.started.set()
        self._maybe_misbehave(context, ended)
        tracks = track_set_from_proto(request.tracks)
        ended["self"] = True
        self.knobs.finished.set()
        return smoother_pb2.SmoothResponse(tracks=track_set_to_proto(tracks), metrics=_metrics(tracks), method="fake_filter")

    def SmoothStream(self, request_iterator, context):
        self.knobs.calls += 1
        self.stream_calls += 1
        ended = _note_cancel(context, self.knobs)
        self.knobs.started.set()
        assembler, video = PoseTrackAssembler(), VideoInfo(0, 0, 0.0, 0, 0.0)
        for request in request_iterator:
            if request.WhichOneof("part") == "header":
                video = video_from_proto(request.header.video)
            else:
                assembler.add_chunk(request.poses)
        self._maybe_misbehave(context, ended)
        tracks = PoseTrackSet(video=video, tracks=assembler.tracks())
        for chunk in chunk_tracks(tracks.tracks, 64):
            yield smoother_pb2.SmoothStreamResponse(poses=chunk)
        ended["self"] = True
        yield smoother_pb2.SmoothStreamResponse(summary=smoother_pb2.SmoothSummary(metrics=_metrics(tracks), method="fake_filter"))
        self.knobs.finished.set()


_KIND = {common_pb2.OUTPUT_FORMAT_BVH: (common_pb2.ARTIFACT_KIND_BVH, "bvh", "application/x-bvh"),
         common_pb2.OUTPUT_FORMAT_FBX: (common_pb2.ARTIFACT_KIND_FBX, "fbx", "application/octet-stream"),
         common_pb2.OUTPUT_FORMAT_GLB: (common_pb2.ARTIFACT_KIND_GLB, "glb", "model/gltf-binary")}


class FakeExporter(exporter_pb2_grpc.ExporterServiceServicer):
    def __init__(self) -> None:
        self.knobs = Knobs()
        self.headers: list[exporter_pb2.ExportHeader] = []
        self.video_bytes = 0

    def Export(self, request_iterator, context):
        k = self.knobs
        k.calls += 1
        ended = _note_cancel(context, k)
        k.started.set()
        header, assembler, video = None, PoseTrackAssembler(), 0
        for request in request_iterator:
            part = request.WhichOneof("part")
            if part == "header":
                header = request.header
                self.headers.append(header)
            elif part == "poses":
                assembler.add_chunk(request.poses)
            else:
                video += len(request.video_chunk)
        self.video_bytes = video
        assert header is not None
        yield exporter_pb2.ExportResponse(progress=exporter_pb2.ExportProgress(step="solve", fraction=0.3))
        if k.mode == "fail":
            ended["self"] = True
            context.abort_with_status(to_grpc_status(FailedPrecondition("too few confident frames", reason="UNSOLVABLE")))
        stem = header.name_stem or "take"
        files: list[tuple[str, int, int, str, bytes]] = []
        for track in assembler.tracks():
            for fmt in header.formats or (1, 2, 3):
                kind, ext, media = _KIND[fmt]
                body = f"{ext} animation of person {track.track_id}, {len(track)} frames\n".encode() * 50
                files.append((f"{stem}-person-{track.track_id}.{ext}", kind, track.track_id, media, body))
        if header.preview:
            files.append((f"{stem}-preview.mp4", common_pb2.ARTIFACT_KIND_PREVIEW, 0, "video/mp4", b"\x00" * (1536 * 1024) + b"preview"))
        for i, (name, kind, track_id, media, body) in enumerate(files):
            sha = hashlib.sha256(body).hexdigest()
            if k.mode == "corrupt" and i == 0:
                sha = hashlib.sha256(b"something else").hexdigest()
            yield exporter_pb2.ExportResponse(file=exporter_pb2.ExportedFile(
                filename=name, kind=kind, track_id=track_id, size_bytes=len(body), sha256=sha, media_type=media))
            for offset in range(0, len(body), 1000):
                yield exporter_pb2.ExportResponse(chunk=exporter_pb2.FileChunk(offset=offset, data=body[offset:offset + 1000]))
                if i == 0 and offset == 0 and not _wait_at_gate(context, k):  # a file half sent
                    return
            if k.mode == "hang":
                _hang_until_cancelled(context, k)
                return
        quality = [common_pb2.TrackQuality(track_id=t.track_id, foot_skate_mm=1.5, foot_contact_fraction=0.4,
                                           frames_solved_fraction=1.0) for t in assembler.tracks()]
        ended["self"] = True
        yield exporter_pb2.ExportResponse(result=exporter_pb2.ExportResult(quality=quality, blender_seconds=0.1))
        k.finished.set()


class FakeStages:
    """The three fakes, each on its own real gRPC server (port 0) in this process."""

    def __init__(self) -> None:
        self.tracker, self.smoother, self.exporter = FakeTracker(), FakeSmoother(), FakeExporter()
        self._servers: list[grpc.Server] = []
        self.servers: dict[str, grpc.Server] = {}
        self.addresses: dict[str, str] = {}
        for name, servicer, add in (
            ("tracker", self.tracker, tracker_pb2_grpc.add_TrackerServiceServicer_to_server),
            ("smoother", self.smoother, smoother_pb2_grpc.add_SmootherServiceServicer_to_server),
            ("exporter", self.exporter, exporter_pb2_grpc.add_ExporterServiceServicer_to_server),
        ):
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                 options=(("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)))
            add(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            self._servers.append(server)
            self.servers[name] = server
            self.addresses[name] = f"127.0.0.1:{port}"

    def stop(self) -> None:
        for server in self._servers:
            server.stop(0)

    def kill(self, name: str) -> None:
        """Stops one fake's server at once, aborting its calls in flight (a replica that dies)."""
        self.servers[name].stop(0).wait(10)

    def config_overrides(self, absent: tuple[str, ...] = ()) -> dict[str, str]:
        """Stage addresses for GatewayConfig; an absent stage gets a port nothing listens on."""
        return {f"{name}_addr": (f"127.0.0.1:{free_port()}" if name in absent else address)
                for name, address in self.addresses.items()}

    def flags(self, absent: tuple[str, ...] = ()) -> list[str]:
        flags = []
        for key, value in self.config_overrides(absent).items():
            flags += [f"--{key.replace('_', '-')}", value]
        return flags
