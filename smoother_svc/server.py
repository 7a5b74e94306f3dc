"""The gRPC adapter of the smoother: decode requests, call `SmootherService` (`service.py`), encode
responses, map the domain's errors to status codes (`SMOOTHER_ERRORS`, one table, applied to every
handler by `mapped_errors`)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2

from mocap.v1 import common_pb2, smoother_pb2, smoother_pb2_grpc
from mocap_common.channels import downstream_timeout
from mocap_common.errors import (
    Aborted,
    As,
    ErrorTable,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from mocap_common.lease_client import LeaseLost
from mocap_common.logs import bind_context
from mocap_common.paging import page_of
from mocap_common.posecodec import (
    DEFAULT_FRAMES_PER_CHUNK,
    PoseTrackAssembler,
    chunk_tracks,
    track_set_from_proto,
    track_set_to_proto,
)
from mocap_common.poses import PoseTrack, PoseTrackSet
from mocap_common.rpc_errors import mapped_errors
from mocap_common.server import MAX_MESSAGE_BYTES, ServiceHost
from mocap_common.streams import draining
from smoother_svc import presets
from smoother_svc.checkpoints import CheckpointInfo, CheckpointStore
from smoother_svc.config import SmootherConfig
from smoother_svc.errors import BadTracks, CheckpointWriteFailed, NoCheckpoint, TrainingFailed, TrainingInterrupted
from smoother_svc.metrics import TrackMetrics
from smoother_svc.service import SmootherService, TrainingDefaults
from smoother_svc.smoothing import SmoothingPlan
from smoother_svc.trainer import CheckpointPublished, LeaseGranted, ServedModel, Trainer, TrainProgressEvent
from smoother_svc.training import TrainingConfig

_PRESETS = {
    common_pb2.SMOOTHING_PRESET_UNSPECIFIED: None,
    common_pb2.SMOOTHING_PRESET_OFF: presets.OFF,
    common_pb2.SMOOTHING_PRESET_LIGHT: presets.LIGHT,
    common_pb2.SMOOTHING_PRESET_STANDARD: presets.STANDARD,
    common_pb2.SMOOTHING_PRESET_STRONG: presets.STRONG,
}
_METHODS = {
    smoother_pb2.SMOOTHING_METHOD_UNSPECIFIED: None,
    smoother_pb2.SMOOTHING_METHOD_NONE: presets.NONE,
    smoother_pb2.SMOOTHING_METHOD_ONE_EURO: presets.ONE_EURO,
    smoother_pb2.SMOOTHING_METHOD_SAVITZKY_GOLAY: presets.SAVGOL,
    smoother_pb2.SMOOTHING_METHOD_BUTTERWORTH: presets.BUTTERWORTH,
    smoother_pb2.SMOOTHING_METHOD_KALMAN_RTS: presets.KALMAN_RTS,
    smoother_pb2.SMOOTHING_METHOD_LEARNED: presets.LEARNED,
    smoother_pb2.SMOOTHING_METHOD_ONE_EURO_MEDIAPIPE: presets.ONE_EURO_MEDIAPIPE,
}
_METHOD_TO_PROTO = {method: value for value, method in _METHODS.items() if method is not None}
_SHUTDOWN_RETRY_S = 5.0


def _bad_tracks(error: BadTracks) -> dict[str, object]:
    return {"violations": [FieldViolation(error.field, error.description)]}


def _bad_method(error: presets.PresetError) -> dict[str, object]:
    return {"violations": [FieldViolation("options.method", str(error))]}


# The status a client sees for each named domain error (the one place where they are mapped).
# LEASE_LOST is ABORTED, as from the tracker and the broker.
SMOOTHER_ERRORS: ErrorTable = {
    BadTracks: As(InvalidArgument, "BAD_TRACKS", details=_bad_tracks),
    presets.PresetError: As(InvalidArgument, details=_bad_method),
    NoCheckpoint: As(FailedPrecondition, "NO_CHECKPOINT"),
    LeaseLost: As(Aborted, "LEASE_LOST", "training stopped: {error}"),
    TrainingFailed: As(Aborted, "TRAINING_FAILED", "training failed: {error}"),
    TrainingInterrupted: As(Unavailable, retry_after_s=_SHUTDOWN_RETRY_S),
    CheckpointWriteFailed: As(Internal, "TRAINING_FAILED", "training finished but its checkpoint could not be stored"),
}


class SmootherServicer(smoother_pb2_grpc.SmootherServiceServicer):
    def __init__(self, config: SmootherConfig, store: CheckpointStore, served: ServedModel, trainer: Trainer) -> None:
        self.config = config  # the adapter's own limits: max_unary_bytes, max_stream_frames, acquire timeout
        self.service = SmootherService(config, store, served, trainer)

    def close(self) -> None:
        self.service.close()

    # --- Smooth ---------------------------------------------------------------------------

    async def Smooth(self, request: smoother_pb2.SmoothRequest, context: grpc.aio.ServicerContext) -> smoother_pb2.SmoothResponse:
        with mapped_errors(SMOOTHER_ERRORS):
            if request.job:
                bind_context(job=request.job)
            preset, method, max_gap = _decode_options(request.options, "options")
            track_set = track_set_from_proto(request.tracks, "tracks")
            plan, smoothed = await self.service.smooth(track_set.tracks, preset, method, max_gap)
            applied, checkpoint = _applied(plan)
            response = smoother_pb2.SmoothResponse(
                tracks=track_set_to_proto(PoseTrackSet(track_set.video, [s.track for s in smoothed])),
                metrics=[_metrics_to_proto(s.metrics) for s in smoothed],
                method=plan.label, applied_method=applied, checkpoint=checkpoint,
            )
            limit = min(self.config.max_unary_bytes, MAX_MESSAGE_BYTES)
            if response.ByteSize() > limit:
                raise ResourceExhausted(f"the smoothed tracks exceed the unary limit of {limit} bytes; use SmoothStream",
                                        reason="TRACKS_TOO_LARGE")
            return response

    async def SmoothStream(self, request_iterator: AsyncIterator[smoother_pb2.SmoothStreamRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[smoother_pb2.SmoothStreamResponse]:
        # A stream refused before the client half-closed (header missing or repeated, too many
        # frames) is drained first, so the client gets that status rather than INTERNAL.
        async with draining(request_iterator) as requests:
            with mapped_errors(SMOOTHER_ERRORS):
                header, tracks = await self._receive_stream(requests)
                preset, method, max_gap = _decode_options(header.options, "header.options")
                plan, smoothed = await self.service.smooth(tracks, preset, method, max_gap)
                for chunk in chunk_tracks([s.track for s in smoothed], DEFAULT_FRAMES_PER_CHUNK):
                    yield smoother_pb2.SmoothStreamResponse(poses=chunk)
                applied, checkpoint = _applied(plan)
                yield smoother_pb2.SmoothStreamResponse(summary=smoother_pb2.SmoothSummary(
                    metrics=[_metrics_to_proto(s.metrics) for s in smoothed], method=plan.label,
                    applied_method=applied, checkpoint=checkpoint))

    async def _receive_stream(self, requests: AsyncIterator[smoother_pb2.SmoothStreamRequest]
                              ) -> tuple[smoother_pb2.SmoothStreamHeader, list[PoseTrack]]:
        header: smoother_pb2.SmoothStreamHeader | None = None
        assembler = PoseTrackAssembler()
        index = 0
        async for message in requests:
            part = message.WhichOneof("part")
            if header is None and part != "header":
                raise InvalidArgument("the first SmoothStream message must be a header", reason="HEADER_REQUIRED",
                                      violations=[FieldViolation("header", "required in the first message")])
            if part == "header":
                if header is not None:
                    raise InvalidArgument("only the first SmoothStream message may be a header", reason="HEADER_REQUIRED",
                                          violations=[FieldViolation("header", "sent twice")])
                header = message.header
                if header.job:
                    bind_context(job=header.job)
            elif part == "poses":
                assembler.add_chunk(message.poses, f"poses[{index}]")
                index += 1
                if assembler.frames > self.config.max_stream_frames:
                    raise ResourceExhausted(f"more than {self.config.max_stream_frames} frames in one SmoothStream",
                                            reason="TRACKS_TOO_LARGE")
        if header is None:
            raise InvalidArgument("SmoothStream ended before its header", reason="EMPTY_UPLOAD",
                                  violations=[FieldViolation("header", "required")])
        return header, assembler.tracks()

    # --- Train and checkpoints ------------------------------------------------------------

    async def Train(self, request: smoother_pb2.TrainRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[smoother_pb2.TrainResponse]:
        with mapped_errors(SMOOTHER_ERRORS):
            config, device = _decode_train(request, self.service.training_defaults)
            timeout = downstream_timeout(context, self.config.lease_acquire_timeout_s)
            async for event in self.service.train(config, device=device, acquire_timeout_s=timeout):
                if isinstance(event, LeaseGranted):
                    continue  # the first progress message (epoch 0) names the lease
                if isinstance(event, TrainProgressEvent):
                    p = event.progress
                    yield smoother_pb2.TrainResponse(progress=smoother_pb2.TrainProgress(
                        epoch=p.epoch, epochs=p.epochs, step=p.step, loss=_finite(p.loss),
                        val_accel_error_mm=p.val_accel_error_mm, val_mpjpe_mm=p.val_mpjpe_mm, lease=event.lease))
                elif isinstance(event, CheckpointPublished):
                    yield smoother_pb2.TrainResponse(checkpoint=_checkpoint_to_proto(event.checkpoint))

    async def ListCheckpoints(self, request: smoother_pb2.ListCheckpointsRequest,
                              context: grpc.aio.ServicerContext) -> smoother_pb2.ListCheckpointsResponse:
        with mapped_errors(SMOOTHER_ERRORS):
            infos = await self.service.checkpoints()  # newest first
            page, token = page_of(infos, lambda info: (-info.number,), request.page_size, request.page_token,
                                  list_name="checkpoints")
            return smoother_pb2.ListCheckpointsResponse(checkpoints=[_checkpoint_to_proto(i) for i in page],
                                                        next_page_token=token)


# --- decoding -------------------------------------------------------------------------------


def _decode_options(options: smoother_pb2.SmoothOptions, where: str) -> tuple[str | None, str | None, float | None]:
    if options.preset not in _PRESETS:
        raise _invalid(f"{where}.preset", f"unknown preset {options.preset}")
    if options.method not in _METHODS:
        raise _invalid(f"{where}.method", f"unknown method {options.method}")
    gap = options.max_gap_seconds
    if not math.isfinite(gap) or gap > presets.MAX_GAP_LIMIT_S:
        raise _invalid(f"{where}.max_gap_seconds", f"must be a number ≤ {presets.MAX_GAP_LIMIT_S:g}")
    max_gap = None if gap == 0 else (-1.0 if gap < 0 else gap)
    preset, method = _PRESETS[options.preset], _METHODS[options.method]
    if preset == presets.OFF and method not in (None, presets.NONE):
        raise _invalid(f"{where}.method", "must be UNSPECIFIED or NONE with preset OFF")
    return preset, method, max_gap


def _decode_train(request: smoother_pb2.TrainRequest, defaults: TrainingDefaults) -> tuple[TrainingConfig, str]:
    """Validates every field (INVALID_ARGUMENT naming each bad one); 0 (or "") takes the service's default."""
    violations: list[FieldViolation] = []

    def integer(name: str, value: int, low: int, high: int, default: int) -> int:
        if value == 0:
            return default
        if not low <= value <= high:
            violations.append(FieldViolation(name, f"must be {low}..{high} (0 = default {default})"))
        return value

    def real(name: str, value: float, low: float, high: float, default: float, low_open: bool = True) -> float:
        if value == 0:
            return default
        ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
        if not ok:
            violations.append(FieldViolation(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}] (0 = default {default:g})"))
        return value

    training = TrainingConfig(
        epochs=integer("epochs", request.epochs, 1, 1000, defaults.epochs),
        steps_per_epoch=integer("steps_per_epoch", request.steps_per_epoch, 1, 100_000, defaults.steps_per_epoch),
        window=integer("window", request.window, 8, 64, defaults.window),
        batch_size=integer("batch_size", request.batch_size, 1, 4096, defaults.batch_size),
        learning_rate=real("learning_rate", request.learning_rate, 0.0, 1.0, defaults.learning_rate),
        seed=request.seed if request.seed != 0 else defaults.new_seed(),
        noise_scale=real("noise_scale", request.noise_scale, 0.0, 10.0, defaults.noise_scale),
        max_seconds=real("max_seconds", request.max_seconds, 0.0, 86_400.0, defaults.max_seconds),
        noise_spread=real("noise_spread", request.noise_spread, 1.0, 10.0, defaults.noise_spread, low_open=False),
    )
    device = request.device.strip() or defaults.device
    if len(device) > 128:
        violations.append(FieldViolation("device", "at most 128 characters"))
    if violations:
        raise InvalidArgument("invalid training parameters: " + "; ".join(f"{v.field} {v.description}" for v in violations),
                              violations=violations)
    return training, device


# --- encoding -------------------------------------------------------------------------------


def _applied(plan: SmoothingPlan) -> tuple[int, str]:
    """The method a plan applies as the enum, and the checkpoint's resource name when learned."""
    if plan.learned is not None:
        return smoother_pb2.SMOOTHING_METHOD_LEARNED, _checkpoint_name(plan.learned.version)
    return _METHOD_TO_PROTO[plan.label], ""


def _checkpoint_name(version: str) -> str:
    return f"checkpoints/{version}"


def _metrics_to_proto(m: TrackMetrics) -> smoother_pb2.SmoothingMetrics:
    return smoother_pb2.SmoothingMetrics(
        track_id=m.track_id, jitter_before_mm=m.jitter_before_mm, jitter_after_mm=m.jitter_after_mm,
        mean_displacement_mm=m.mean_displacement_mm, joint_coverage=list(m.joint_coverage),
        frames_filled=m.frames_filled,
    )


def _checkpoint_to_proto(info: CheckpointInfo) -> smoother_pb2.Checkpoint:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(info.create_time)
    return smoother_pb2.Checkpoint(
        name=_checkpoint_name(info.version), version=info.version, create_time=created, window=info.window,
        epochs=info.epochs,
        val_accel_error_mm=info.val_accel_error_mm, val_mpjpe_mm=info.val_mpjpe_mm,
        val_accel_error_input_mm=info.val_accel_error_input_mm, val_mpjpe_input_mm=info.val_mpjpe_input_mm,
        training_clips=list(info.training_clips), validation_clip=info.validation_clip, seed=info.seed,
        noise_source=info.noise_source, steps=info.steps,
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


# --- errors ---------------------------------------------------------------------------------


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"{field} {description}", violations=[FieldViolation(field, description)])


def add_to(host: ServiceHost, servicer: SmootherServicer) -> None:
    host.add_servicer(smoother_pb2_grpc.add_SmootherServiceServicer_to_server, servicer, smoother_pb2, "SmootherService")
