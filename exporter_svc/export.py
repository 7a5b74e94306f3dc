"""One export, start to finish, with no gRPC in sight: tracks in, files and quality figures out.

    resample each track to the animation rate (timeline.py)
    → estimate its path from the image (rootpath.py) → solve the skeleton (solve.py, feet.py)
    → BVH per person (bvh_writer.py)
    → in parallel: FBX + GLB in one Blender child (blender_job.py) and the preview MP4 (preview.py)
    → quality report (quality.py)

All files are written into the caller's per-call directory (`workspace.py`), which the caller
removes. CPU work runs in worker threads that check a stop flag, so a cancelled call stops within
a frame or a track and never writes into a directory being removed; the Blender child is killed
with its process group (`blender_job.run_blender`).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from exporter_svc import bvh_writer, quality
from exporter_svc.blender_job import BlenderPerson, run_blender, write_spec
from exporter_svc.rootpath import NOMINAL_HFOV_DEG, estimate_root_path
from exporter_svc.solve import SolveOptions, SolvedTake, TakeInput, Unsolvable, solve_take
from exporter_svc.timeline import ResampledTrack, animation_fps, resample
from mocap.v1 import common_pb2, exporter_pb2
from mocap_common.errors import Cancelled, ServiceError
from mocap_common.logs import get_logger
from mocap_common.poses import PoseTrack, VideoInfo
from mocap_common.procs import finish_uncancellable

log = get_logger(__name__)
T = TypeVar("T")

# OutputFormat enum value → format name used in file names and specs.
FORMAT_NAMES = {common_pb2.OUTPUT_FORMAT_BVH: "bvh", common_pb2.OUTPUT_FORMAT_FBX: "fbx",
                common_pb2.OUTPUT_FORMAT_GLB: "glb"}
MEDIA_TYPES = {"bvh": "text/plain", "fbx": "application/octet-stream", "glb": "model/gltf-binary",
               "preview": "video/mp4"}
ProgressFn = Callable[[str, float], None]


@dataclass(frozen=True)
class ExportOptions:
    formats: tuple[str, ...]  # subset of "bvh", "fbx", "glb"
    preview: bool
    in_place: bool
    foot_locking: bool
    name_stem: str
    camera_hfov_deg: float | None = None  # None = NOMINAL_HFOV_DEG


@dataclass
class ExportInput:
    tracks: list[PoseTrack]
    video: VideoInfo
    video_path: Path | None = None  # the spooled input video (preview only)
    job: str = ""  # "jobs/{job}", for logs


@dataclass
class ProducedFile:
    path: Path
    filename: str
    kind: str  # "bvh", "fbx", "glb", "preview"
    track_id: int  # 0 = every person
    media_type: str


@dataclass
class ExportOutcome:
    files: list[ProducedFile]
    quality: list[common_pb2.TrackQuality]
    solve: list[exporter_pb2.SolveQuality]
    fps: float
    blender_seconds: float = 0.0
    blender_startup_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Person:
    track: PoseTrack
    resampled: ResampledTrack | None = None
    take: SolvedTake | None = None
    note: str = ""

    @property
    def name(self) -> str:
        return f"person-{self.track.track_id}"


class Exporter:
    """Runs exports; at most `max_blender` Blender children at a time across all calls."""

    def __init__(self, *, python: str, blender_timeout_s: float, max_blender: int = 2,
                 child_env: dict[str, str] | None = None) -> None:
        self._python = python
        self._blender_timeout_s = blender_timeout_s
        self._blender_slots = asyncio.Semaphore(max_blender)
        self._child_env = child_env

    async def export(self, job: ExportInput, options: ExportOptions, workdir: Path,
                     progress: ProgressFn = lambda step, fraction: None,
                     time_left_s: Callable[[], float | None] = lambda: None) -> ExportOutcome:
        timings: dict[str, float] = {}
        fps = animation_fps(job.video.fps, job.tracks)
        progress("solve", 0.0)
        started = time.perf_counter()
        people = await _in_thread(_solve_all, job, options, fps)
        timings["solve_s"] = time.perf_counter() - started
        solved = [p for p in people if p.take is not None]
        if not solved:
            reasons = "; ".join(f"track {p.track.track_id}: {p.note}" for p in people)
            raise Unsolvable(f"no track could be solved ({reasons})")
        files: list[ProducedFile] = []
        if "bvh" in options.formats:
            progress("bvh", 0.25)
            started = time.perf_counter()
            files += await _in_thread(_write_bvh_files, solved, options.name_stem, fps, workdir)
            timings["bvh_s"] = time.perf_counter() - started
        progress("blender" if set(options.formats) & {"fbx", "glb"} else "preview", 0.3)
        blender_files, blender_run, preview_file = await self._blender_and_preview(job, options, solved, fps, workdir,
                                                                                   timings, time_left_s)
        files += blender_files
        if preview_file is not None:
            files.append(preview_file)
        track_quality = [quality.track_quality(p.track, p.resampled, p.take) for p in people]
        progress("send", 0.9)
        return ExportOutcome(
            files=files, quality=track_quality,
            solve=[quality.solve_quality(p.track.track_id, p.take, p.note) for p in people],
            fps=fps,
            blender_seconds=blender_run.seconds if blender_run else 0.0,
            blender_startup_seconds=blender_run.startup_seconds if blender_run else 0.0,
            timings=timings,
        )

    async def _blender_and_preview(self, job: ExportInput, options: ExportOptions, solved: list[_Person], fps: float,
                                   workdir: Path, timings: dict[str, float],
                                   time_left_s: Callable[[], float | None]) -> tuple[list[ProducedFile], Any, ProducedFile | None]:
        """FBX/GLB and the preview in parallel (one is a child process, the other a thread that
        mostly waits on the video codec); if one fails the other is cancelled."""
        formats = [f for f in ("fbx", "glb") if f in options.formats]
        blender_task = preview_task = None
        try:
            async with asyncio.TaskGroup() as group:
                if formats:
                    blender_task = group.create_task(self._run_blender(solved, formats, fps, options.name_stem,
                                                                       workdir, timings, time_left_s))
                if options.preview:
                    preview_task = group.create_task(self._render_preview(job, options.name_stem, workdir, timings))
        except BaseExceptionGroup as group_error:
            # Report the first real failure (a ServiceError where there is one), not the group.
            errors = group_error.exceptions
            raise next((e for e in errors if isinstance(e, ServiceError)), errors[0]) from None
        blender_files, blender_run = blender_task.result() if blender_task else ([], None)
        return blender_files, blender_run, preview_task.result() if preview_task else None

    async def _run_blender(self, solved: list[_Person], formats: list[str], fps: float, stem: str, workdir: Path,
                           timings: dict[str, float], time_left_s: Callable[[], float | None]) -> tuple[list[ProducedFile], Any]:
        spec_dir = workdir / "blender"
        spec_dir.mkdir()
        persons = [BlenderPerson(track_id=p.track.track_id, name=p.name, skeleton=p.take.skeleton,  # type: ignore[union-attr]
                                 motion=p.take.export_motion(), start_frame=p.resampled.start_frame)  # type: ignore[union-attr]
                   for p in solved]
        outputs = await _in_thread(_write_spec, spec_dir, persons, fps, formats, stem)
        async with self._blender_slots:
            left = time_left_s()
            timeout = self._blender_timeout_s if left is None else max(0.1, min(self._blender_timeout_s, left))
            run = await run_blender(spec_dir, outputs, python=self._python, timeout_s=timeout, env=self._child_env)
        timings["blender_s"] = run.seconds
        files = [ProducedFile(path, path.name, kind, 0, MEDIA_TYPES[kind]) for kind, path in run.outputs.items()]
        return files, run

    async def _render_preview(self, job: ExportInput, stem: str, workdir: Path,
                              timings: dict[str, float]) -> ProducedFile:
        from exporter_svc import preview  # noqa: PLC0415 - PyAV is only needed when a preview is asked for

        assert job.video_path is not None
        out = workdir / f"{stem}-preview.mp4"
        started = time.perf_counter()
        await _in_thread(preview.render_preview, job.video_path, job.tracks, out)
        timings["preview_s"] = time.perf_counter() - started
        return ProducedFile(out, out.name, "preview", 0, MEDIA_TYPES["preview"])


# --- CPU work in worker threads ----------------------------------------------------------------

async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Runs fn(*args, stop=Event) in a worker thread. If the caller is cancelled, sets `stop` and
    waits for the thread to notice (it checks between tracks / frames) before re-raising, so no
    thread keeps writing into a directory the caller is about to remove."""
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, stop=stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        try:
            await finish_uncancellable(asyncio.wait({future}))
        finally:
            _settle_abandoned(future, fn)
        raise


def _settle_abandoned(future: asyncio.Future[Any], fn: Callable[..., Any]) -> None:
    """Reads the outcome of a worker whose caller was cancelled, so it is not reported as an
    error. When the awaiting task is cancelled, asyncio.shield drops its link to the inner future,
    so nothing else ever reads it; an exception left unread is logged at ERROR level ("Future
    exception was never retrieved") when the future is collected — and a stopped worker always
    ends with one: `Cancelled` from `check_stop`, the expected ending."""
    if future.cancelled():
        return
    error = future.exception()  # marks it retrieved
    step = getattr(fn, "__name__", repr(fn))
    if error is None or isinstance(error, Cancelled):
        log.info("worker stopped: its call was cancelled", step=step)
    else:  # it failed on its own meanwhile; the call is cancelled anyway, so this is no error of it
        log.warning("worker failed after its call was cancelled", step=step, error=repr(error))


def check_stop(stop: threading.Event) -> None:
    if stop.is_set():
        raise Cancelled("export cancelled")


def _solve_all(job: ExportInput, options: ExportOptions, fps: float, *, stop: threading.Event) -> list[_Person]:
    people = []
    for track in job.tracks:
        check_stop(stop)
        person = _Person(track=track)
        person.resampled = resample(track, fps)
        r = person.resampled
        root = estimate_root_path(r.image, r.world, job.video.width, job.video.height, fps,
                                  options.camera_hfov_deg or NOMINAL_HFOV_DEG)
        take_input = TakeInput(world=r.world, visibility=r.image[..., 3], root=root, root_is_estimate=True)
        try:
            person.take = solve_take(take_input, SolveOptions(fps=fps, in_place=options.in_place,
                                                              foot_locking=options.foot_locking))
        except Unsolvable as exc:
            person.note = exc.message
            log.warning("track not solvable; skipped", track_id=track.track_id, reason=exc.message)
        if root is None and person.take is not None:
            person.note = "no image landmarks or video size: the hips stay above the origin"
        people.append(person)
    return people


def _write_bvh_files(solved: list[_Person], stem: str, fps: float, workdir: Path, *,
                     stop: threading.Event) -> list[ProducedFile]:
    files = []
    for person in solved:
        check_stop(stop)
        assert person.take is not None
        path = workdir / f"{stem}-{person.name}.bvh"
        bvh_writer.write_bvh(path, person.take.skeleton, person.take.export_motion(), fps)
        files.append(ProducedFile(path, path.name, "bvh", person.track.track_id, MEDIA_TYPES["bvh"]))
    return files


def _write_spec(spec_dir: Path, persons: list[BlenderPerson], fps: float, formats: list[str], stem: str, *,
                stop: threading.Event) -> dict[str, str]:
    check_stop(stop)
    return write_spec(spec_dir, persons, fps, formats, stem)
