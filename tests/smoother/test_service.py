"""The smoother through its public gRPC surface, as real child processes: Smooth, SmoothStream,
ListCheckpoints (and its pages), errors, and Train under a real resource broker (resource_svc) — the lease is
ACTIVE while training and RELEASED after, also when training fails, is cancelled, or loses its
lease."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from mocap.v1 import common_pb2, resource_pb2, resource_pb2_grpc, smoother_pb2, smoother_pb2_grpc
from mocap_common.posecodec import chunk_tracks, track_set_to_proto, video_to_proto
from mocap_common.poses import PoseTrack, PoseTrackSet
from mocap_common.paging import encode_token
from mocap_common.rpc_errors import describe_rpc_error
from smoother_svc import presets
from smoother_svc.checkpoints import CheckpointStore
from smoother_svc.noise import load_noise_model
from smoother_svc.reference_data import load_clip, noisy_track, track_set
from smoother_svc.smoothnet import SmoothNet
from smoother_svc.training import TrainedModel, TrainingConfig
from tests.smoother.helpers import MOCAP_DIR
from tests.support import ServiceProcess

# A tiny training run: enough to exercise every step, a few seconds on one core.
TINY_TRAIN = smoother_pb2.TrainRequest(epochs=1, steps_per_epoch=8, batch_size=32, seed=5)
STANDARD = smoother_pb2.SmoothOptions(preset=common_pb2.SMOOTHING_PRESET_STANDARD)
LEARNED = smoother_pb2.SMOOTHING_METHOD_LEARNED


def method_enum(label: str) -> int:
    """The SmoothingMethod of one of the smoother's method labels ("kalman_rts", "savgol", ...)."""
    return smoother_pb2.SmoothingMethod.Value("SMOOTHING_METHOD_" + {"savgol": "SAVITZKY_GOLAY"}.get(label, label).upper())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoother")


@pytest.fixture(scope="module")
def broker(workdir):
    with ServiceProcess("resource_svc", ["--db-path", str(workdir / "leases.sqlite3"), "--inventory", "cpu"],
                        log_path=workdir / "broker.log") as process:
        yield process


def smoother_process(workdir: Path, name: str, broker_address: str, *extra: str) -> ServiceProcess:
    return ServiceProcess("smoother_svc", ["--checkpoint-dir", str(workdir / name / "checkpoints"),
                                           "--resource-addr", broker_address, "--mocap-dir", str(MOCAP_DIR), *extra],
                          log_path=workdir / f"{name}.log")


@pytest.fixture(scope="module")
def smoother(workdir, broker):
    with smoother_process(workdir, "main", broker.address) as process:
        yield process


def untrained_checkpoint() -> TrainedModel:
    """A checkpoint as cheap as one can be: an untrained network (for listings, not smoothing)."""
    return TrainedModel(state_dict=SmoothNet(window=32).state_dict(), window=32, epochs_completed=0, steps=0,
                        val_accel_error_mm=0.0, val_mpjpe_mm=0.0, val_accel_error_input_mm=0.0, val_mpjpe_input_mm=0.0,
                        config=TrainingConfig(seed=1), noise_source="test: untrained")


@pytest.fixture(scope="module")
def five_checkpoints(workdir):
    store = CheckpointStore(workdir / "five" / "checkpoints")
    for _ in range(5):
        store.save(untrained_checkpoint())
    return store


@pytest.fixture(scope="module")
def five_checkpoints_smoother(workdir, broker, five_checkpoints):
    with smoother_process(workdir, "five", broker.address) as process:
        yield process


@pytest.fixture(scope="module")
def no_checkpoint_smoother(workdir, broker):
    """Its checkpoint directory cannot exist (a file is in the way): trainings fail to publish."""
    (workdir / "blocked").mkdir()
    (workdir / "blocked" / "checkpoints").write_text("a file, not a directory")
    with smoother_process(workdir, "blocked", broker.address) as process:
        yield process


def noisy_set(gap: bool = False, tracks: int = 1) -> PoseTrackSet:
    clip = load_clip(MOCAP_DIR, "cmu_131_03")
    made = []
    for k in range(tracks):
        track = noisy_track(clip, load_noise_model(), np.random.default_rng(40 + k), track_id=k + 1)
        if gap:  # frames 100-102 missing: a short gap
            keep = np.ones(len(track), bool)
            keep[100:103] = False
            track = PoseTrack(track.track_id, track.frame_index[keep], track.timestamp_s[keep], track.image[keep],
                              track.world[keep], track.bbox[keep], track.score[keep])
        made.append(track)
    return track_set(clip, made)


async def smooth(address: str, tracks: PoseTrackSet, options=STANDARD) -> smoother_pb2.SmoothResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        return await stub.Smooth(smoother_pb2.SmoothRequest(options=options, tracks=track_set_to_proto(tracks)),
                                 timeout=120)


async def rpc_error(awaitable) -> object:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return describe_rpc_error(caught.value)


async def leases(address: str) -> list[resource_pb2.Lease]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = resource_pb2_grpc.ResourceServiceStub(channel)
        return list((await stub.ListLeases(resource_pb2.ListLeasesRequest(page_size=1000), timeout=10)).leases)


async def lease_state(address: str, name: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = resource_pb2_grpc.ResourceServiceStub(channel)
        return (await stub.GetLease(resource_pb2.GetLeaseRequest(name=name), timeout=10)).state


async def wait_lease_ended(address: str, name: str, timeout_s: float = 30.0) -> int:
    """Polls GetLease until the lease is no longer ACTIVE (the release is asynchronous to the
    client's view of the RPC's end only by milliseconds; the bound is generous for a loaded host)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        state = await lease_state(address, name)
        if state != resource_pb2.LEASE_STATE_ACTIVE or asyncio.get_running_loop().time() > deadline:
            return state
        await asyncio.sleep(0.1)


# --- Smooth / SmoothStream ------------------------------------------------------------------


async def test_smooth_cuts_jitter_and_fills_short_gaps(smoother):
    tracks = noisy_set(gap=True)
    options = smoother_pb2.SmoothOptions(preset=common_pb2.SMOOTHING_PRESET_LIGHT)
    response = await smooth(smoother.address, tracks, options)
    assert response.method == presets.PRESET_METHOD[presets.LIGHT]
    assert response.applied_method == method_enum(response.method) and response.checkpoint == ""  # the same, as an enum
    [metrics] = response.metrics
    assert metrics.track_id == 1 and metrics.frames_filled == 3
    assert metrics.jitter_after_mm < 0.3 * metrics.jitter_before_mm
    assert len(metrics.joint_coverage) == 33 and 0 < metrics.mean_displacement_mm < 100
    [track] = response.tracks.tracks
    assert len(track.frames) == len(tracks.tracks[0]) + 3
    filled = [f for f in track.frames if 100 <= f.frame_index <= 102]
    assert len(filled) == 3 and all(f.score == 0 and f.image_landmarks[3] == 0 for f in filled)


@pytest.mark.parametrize("preset", [common_pb2.SMOOTHING_PRESET_OFF, common_pb2.SMOOTHING_PRESET_STRONG])
async def test_presets(smoother, preset):
    tracks = noisy_set(gap=True)
    response = await smooth(smoother.address, tracks, smoother_pb2.SmoothOptions(preset=preset))
    if preset == common_pb2.SMOOTHING_PRESET_OFF:  # the tracker's output, untouched, gaps included
        assert response.method == "none" and response.metrics[0].frames_filled == 0
        assert response.applied_method == smoother_pb2.SMOOTHING_METHOD_NONE
        assert response.tracks == track_set_to_proto(tracks)
    else:
        assert response.method == presets.PRESET_METHOD[presets.STRONG]


async def test_stream_gives_exactly_the_unary_result(smoother):
    tracks = noisy_set(gap=True, tracks=3)
    unary = await smooth(smoother.address, tracks)

    async def requests():
        yield smoother_pb2.SmoothStreamRequest(header=smoother_pb2.SmoothStreamHeader(
            job="jobs/test", options=STANDARD, video=video_to_proto(tracks.video)))
        for chunk in chunk_tracks(tracks.tracks, frames_per_chunk=100):
            yield smoother_pb2.SmoothStreamRequest(poses=chunk)

    pieces: dict[int, list[common_pb2.PoseFrame]] = {}
    summary = None
    async with grpc.aio.insecure_channel(smoother.address) as channel:
        async for message in smoother_pb2_grpc.SmootherServiceStub(channel).SmoothStream(requests(), timeout=120):
            if message.HasField("poses"):
                for piece in message.poses.tracks:
                    pieces.setdefault(piece.track_id, []).extend(piece.frames)
            else:
                summary = message.summary
    assert summary is not None and summary.method == unary.method
    assert (summary.applied_method, summary.checkpoint) == (unary.applied_method, unary.checkpoint)
    assert list(summary.metrics) == list(unary.metrics)
    assert sorted(pieces) == [1, 2, 3]
    for track in unary.tracks.tracks:
        assert pieces[track.track_id] == list(track.frames)


async def test_malformed_tracks_are_bad_tracks(smoother):
    tracks = track_set_to_proto(noisy_set())
    del tracks.tracks[0].frames[5].world_landmarks[-1]
    async with grpc.aio.insecure_channel(smoother.address) as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        details = await rpc_error(stub.Smooth(smoother_pb2.SmoothRequest(tracks=tracks)))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.reason == "BAD_TRACKS"
        assert details.violations[0].field == "tracks.tracks[0].frames[5].world_landmarks"

        tracks = track_set_to_proto(noisy_set())
        tracks.tracks[0].frames[7].image_landmarks[0] = float("nan")
        details = await rpc_error(stub.Smooth(smoother_pb2.SmoothRequest(tracks=tracks)))
        assert details.reason == "BAD_TRACKS" and details.violations[0].field == "tracks[0].frames[7].image_landmarks"


async def test_bad_options_and_streams(smoother):
    tracks = track_set_to_proto(noisy_set())
    async with grpc.aio.insecure_channel(smoother.address) as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        details = await rpc_error(stub.Smooth(smoother_pb2.SmoothRequest(
            tracks=tracks, options=smoother_pb2.SmoothOptions(max_gap_seconds=5.0))))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.violations[0].field == "options.max_gap_seconds"
        details = await rpc_error(stub.Smooth(smoother_pb2.SmoothRequest(tracks=tracks, options=smoother_pb2.SmoothOptions(
            preset=common_pb2.SMOOTHING_PRESET_OFF, method=smoother_pb2.SMOOTHING_METHOD_KALMAN_RTS))))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.violations[0].field == "options.method"

        async def no_header():
            yield smoother_pb2.SmoothStreamRequest(poses=common_pb2.PoseChunk())

        call = stub.SmoothStream(no_header())
        details = await rpc_error(call.read())
        assert details.reason == "HEADER_REQUIRED"


async def test_learned_without_checkpoint_is_a_failed_precondition(no_checkpoint_smoother):
    options = smoother_pb2.SmoothOptions(method=smoother_pb2.SMOOTHING_METHOD_LEARNED)
    details = await rpc_error(smooth(no_checkpoint_smoother.address, noisy_set(), options))
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION and details.reason == "NO_CHECKPOINT"
    # the STANDARD preset falls back to its classical choice instead of failing jobs
    fallback = presets.CLASSICAL_CHOICE[presets.STANDARD]
    response = await smooth(no_checkpoint_smoother.address, noisy_set())
    assert response.method == fallback
    assert response.applied_method == method_enum(fallback) and response.checkpoint == ""


# --- ListCheckpoints -------------------------------------------------------------------------


async def test_list_checkpoints_pages_newest_first(five_checkpoints_smoother, five_checkpoints):
    async with grpc.aio.insecure_channel(five_checkpoints_smoother.address) as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        # page_size 0, what a client from before paging sends: every checkpoint in one page.
        whole = await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(), timeout=10)
        assert [c.name for c in whole.checkpoints] == [f"checkpoints/v{n}" for n in (5, 4, 3, 2, 1)]
        assert whole.next_page_token == ""

        first = await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(page_size=2), timeout=10)
        assert [c.version for c in first.checkpoints] == ["v5", "v4"] and first.next_page_token
        five_checkpoints.save(untrained_checkpoint())  # v6 appears between two pages: nothing repeats
        seen, token = [c.version for c in first.checkpoints], first.next_page_token
        while token:
            page = await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(page_size=2, page_token=token), timeout=10)
            assert len(page.checkpoints) <= 2
            seen += [c.version for c in page.checkpoints]
            token = page.next_page_token
        assert seen == ["v5", "v4", "v3", "v2", "v1"]
        rest = await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(page_token=first.next_page_token), timeout=10)
        assert [c.version for c in rest.checkpoints] == ["v3", "v2", "v1"] and rest.next_page_token == ""

        foreign = encode_token("devices", ("cpu", 0, "cpu:0"))  # a ListDevices token
        for bad, field in ((smoother_pb2.ListCheckpointsRequest(page_size=-1), "page_size"),
                           (smoother_pb2.ListCheckpointsRequest(page_token="not-a-token"), "page_token"),
                           (smoother_pb2.ListCheckpointsRequest(page_token=foreign), "page_token")):
            details = await rpc_error(stub.ListCheckpoints(bad, timeout=10))
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.violations[0].field == field


# --- Train ----------------------------------------------------------------------------------


async def test_train_holds_the_lease_while_training_and_then_serves_the_checkpoint(smoother, broker):
    async with grpc.aio.insecure_channel(smoother.address) as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        assert list((await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest())).checkpoints) == []
        progress, checkpoint, states_during = [], None, []
        async for message in stub.Train(TINY_TRAIN, timeout=300):
            if message.HasField("progress"):
                progress.append(message.progress)
                states_during.append(await lease_state(broker.address, message.progress.lease))
            else:
                checkpoint = message.checkpoint
        assert checkpoint is not None and checkpoint.version == "v1" and checkpoint.epochs == 1
        assert checkpoint.name == "checkpoints/v1"
        assert checkpoint.validation_clip == "cmu_131_03" and checkpoint.seed == 5
        assert checkpoint.val_accel_error_mm < checkpoint.val_accel_error_input_mm
        assert [p.epoch for p in progress] == [0, 1]
        name = progress[0].lease
        assert name.startswith("leases/") and all(p.lease == name for p in progress)
        assert states_during == [resource_pb2.LEASE_STATE_ACTIVE] * 2
        assert await wait_lease_ended(broker.address, name) == resource_pb2.LEASE_STATE_RELEASED
        [held] = [lease for lease in await leases(broker.address) if lease.name == name]
        assert held.kind == resource_pb2.SLOT_KIND_TRAINING and held.holder.service == "smoother"
        listed = (await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest())).checkpoints
        assert [c.version for c in listed] == ["v1"]
    response = await smooth(smoother.address, noisy_set())
    assert response.method == "learned:v1"  # STANDARD now uses the served checkpoint
    assert response.applied_method == LEARNED and response.checkpoint == "checkpoints/v1"  # nothing to parse


async def test_bad_training_parameters_ask_for_no_lease(smoother, broker):
    before = len(await leases(broker.address))
    async with grpc.aio.insecure_channel(smoother.address) as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        call = stub.Train(smoother_pb2.TrainRequest(window=4, learning_rate=-1.0, noise_scale=float("nan")))
        details = await rpc_error(call.read())
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in details.violations} == {"window", "learning_rate", "noise_scale"}
    assert len(await leases(broker.address)) == before


async def test_cancelled_training_releases_its_lease(smoother, broker):
    async with grpc.aio.insecure_channel(smoother.address) as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        before = [c.version for c in (await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest())).checkpoints]
        call = stub.Train(smoother_pb2.TrainRequest(epochs=1000, steps_per_epoch=1000, batch_size=32))
        first = await call.read()
        name = first.progress.lease
        assert await lease_state(broker.address, name) == resource_pb2.LEASE_STATE_ACTIVE
        call.cancel()
        assert await wait_lease_ended(broker.address, name) == resource_pb2.LEASE_STATE_RELEASED
        after = [c.version for c in (await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest())).checkpoints]
        assert after == before  # nothing published


async def test_failed_training_releases_its_lease(no_checkpoint_smoother, broker):
    """Training runs, then the checkpoint cannot be written (its directory is blocked by a file):
    INTERNAL TRAINING_FAILED, and the lease is released."""
    names = []
    async with grpc.aio.insecure_channel(no_checkpoint_smoother.address) as channel:
        call = smoother_pb2_grpc.SmootherServiceStub(channel).Train(TINY_TRAIN, timeout=300)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for message in call:
                names.append(message.progress.lease)
    details = describe_rpc_error(caught.value)
    assert details.code == grpc.StatusCode.INTERNAL and details.reason == "TRAINING_FAILED"
    assert "checkpoints" not in details.message  # no paths leak
    assert names and await wait_lease_ended(broker.address, names[0]) == resource_pb2.LEASE_STATE_RELEASED


async def test_lost_lease_aborts_training(workdir, broker):
    """The broker freezes (SIGSTOP) past the lease's 2 s TTL: the smoother stops training and the
    call ends ABORTED LEASE_LOST; once the broker runs again the lease is not ACTIVE."""
    with smoother_process(workdir, "short-ttl", broker.address, "--lease-ttl-s", "2") as process:
        async with grpc.aio.insecure_channel(process.address) as channel:
            call = smoother_pb2_grpc.SmootherServiceStub(channel).Train(
                smoother_pb2.TrainRequest(epochs=1000, steps_per_epoch=1000, batch_size=32), timeout=120)
            name = (await call.read()).progress.lease
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    while True:
                        message = await asyncio.wait_for(call.read(), 30)
                        assert message is not grpc.aio.EOF
            finally:
                os.kill(broker.pid, signal.SIGCONT)
        details = describe_rpc_error(caught.value)
        assert details.code == grpc.StatusCode.ABORTED and details.reason == "LEASE_LOST"
        assert await wait_lease_ended(broker.address, name) != resource_pb2.LEASE_STATE_ACTIVE
        published = workdir / "short-ttl" / "checkpoints"
        assert not published.exists() or not any(published.iterdir())  # nothing published
