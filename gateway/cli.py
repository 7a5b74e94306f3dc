"""`mocap`: the command-line client of the gateway.

    mocap submit VIDEO [--formats bvh,fbx,glb] [--smoothing P] [--max-persons N] [--no-preview]
                       [--wait] [--out DIR]
    mocap watch JOB          mocap get JOB [--json]      mocap list [--state S] [--json]
    mocap cancel JOB         mocap delete JOB
    mocap download JOB [--format F | --artifact NAME | --all] --out PATH
    mocap track VIDEO --out FILE.npz [--overlay OUT.mp4]   the tracker alone, no services
                                                           (needs the tracker extra: pip install ".[tracker]")

The gateway address comes from --addr or $MOCAP_GATEWAY_ADDR (default 127.0.0.1:50051), the
bearer token from --token or $MOCAP_TOKEN. JOB is "jobs/j-…" or just "j-…".

Uploads resume by themselves: a request_id is made once per submit, and when the stream breaks
the client asks GetUpload how many bytes the gateway holds and sends the rest. Downloads resume
from a PATH.part file and are checked against the artifact's SHA-256 before they are renamed.
That work is the client library's (`gateway.client`); this module is the arguments and the
terminal UI.

Exit codes (stable, for scripts):
    0  success (for submit --wait and watch: the job SUCCEEDED)
    1  the job FAILED
    2  usage error or invalid input (bad arguments, INVALID_ARGUMENT, FAILED_PRECONDITION,
       ALREADY_EXISTS, OUT_OF_RANGE, a job not in the state the command needs, a message larger
       than gRPC accepts: RESOURCE_EXHAUSTED with neither ErrorInfo nor RetryInfo)
    3  not found (NOT_FOUND: no such job or artifact for this tenant, or no such local file)
    4  the gateway is unavailable or busy (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, a connection
       failure, RESOURCE_EXHAUSTED with a reason or RetryInfo such as TOO_MANY_ACTIVE_JOBS): try
       again later
    5  the job was CANCELLED
    6  authentication failed (UNAUTHENTICATED, PERMISSION_DENIED)
    7  internal error, or a download failed its checksum
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from gateway.client import (
    DEFAULT_ADDR,
    UNARY_TIMEOUT_S,
    Connection,
    DownloadError,
    download_artifact,
    is_message_too_large,
    job_name,
    upload_video,
    watch_job,
)
from mocap.v1 import common_pb2, gateway_pb2
from mocap_common.files import sha256_file
from mocap_common.rpc_errors import describe_rpc_error

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_CANCELLED, EXIT_AUTH, EXIT_INTERNAL = range(8)
EXIT_INTERRUPTED = 130

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_USAGE,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_USAGE,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_UNAVAILABLE,
    grpc.StatusCode.ABORTED: EXIT_UNAVAILABLE,
    grpc.StatusCode.CANCELLED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
}

FORMATS = {"bvh": common_pb2.OUTPUT_FORMAT_BVH, "fbx": common_pb2.OUTPUT_FORMAT_FBX, "glb": common_pb2.OUTPUT_FORMAT_GLB}
SMOOTHING = {"off": common_pb2.SMOOTHING_PRESET_OFF, "light": common_pb2.SMOOTHING_PRESET_LIGHT,
             "standard": common_pb2.SMOOTHING_PRESET_STANDARD, "strong": common_pb2.SMOOTHING_PRESET_STRONG}
ROOT_MOTION = {"path": common_pb2.ROOT_MOTION_PATH, "in-place": common_pb2.ROOT_MOTION_IN_PLACE}
STATES = {"queued": common_pb2.JOB_STATE_QUEUED, "running": common_pb2.JOB_STATE_RUNNING,
          "succeeded": common_pb2.JOB_STATE_SUCCEEDED, "failed": common_pb2.JOB_STATE_FAILED,
          "cancelled": common_pb2.JOB_STATE_CANCELLED}
ARTIFACT_KINDS = {"bvh": common_pb2.ARTIFACT_KIND_BVH, "fbx": common_pb2.ARTIFACT_KIND_FBX, "glb": common_pb2.ARTIFACT_KIND_GLB,
                  "preview": common_pb2.ARTIFACT_KIND_PREVIEW, "quality": common_pb2.ARTIFACT_KIND_QUALITY_REPORT,
                  "tracks": common_pb2.ARTIFACT_KIND_POSE_TRACKS}
STAGE_LABEL = {common_pb2.JOB_STAGE_TRACK: "track", common_pb2.JOB_STAGE_SMOOTH: "smooth", common_pb2.JOB_STAGE_EXPORT: "export"}
# What `mocap track` needs importable: the top-level modules of the tracker extra in
# pyproject.toml (tests/common/test_service_installs.py keeps the two equal).
TRACKER_IMPORTS = ("torch", "av", "tflite", "flatbuffers", "scipy")
TRACKER_INSTALL_HINT = 'pip install ".[tracker]"'


class CliError(Exception):
    """Ends the command with a message on stderr and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# Progress on the terminal


class StageBars:
    """Progress bars per stage, fed by job events."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self._progress = progress
        self._console = console
        self._tasks: dict[int, TaskID] = {}

    def _task(self, stage: int) -> TaskID:
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(STAGE_LABEL.get(stage, "stage"), total=1.0)
        return self._tasks[stage]

    def show(self, event: gateway_pb2.JobEvent) -> None:
        kind = event.type
        if kind == gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED:
            self._console.print(f"{event.job.name or 'job'}: {_state(event.state)}"
                                + (f" — {event.message}" if event.message else ""))
        elif kind == gateway_pb2.JOB_EVENT_TYPE_STAGE_RETRY:
            self._console.print(f"[yellow]{STAGE_LABEL.get(event.stage, 'stage')}: {event.message}[/yellow]")
        elif kind == gateway_pb2.JOB_EVENT_TYPE_RESUMED:
            self._console.print(f"[yellow]{event.message}[/yellow]")
        elif event.stage:
            task = self._task(event.stage)
            done = 1.0 if kind == gateway_pb2.JOB_EVENT_TYPE_STAGE_FINISHED else event.stage_progress
            label = STAGE_LABEL.get(event.stage, "stage")
            if event.frames_total:
                label += f" ({event.frames_done}/{event.frames_total} frames)"
            self._progress.update(task, completed=done, description=label)


def select_artifacts(job: common_pb2.Job, fmt: str | None, artifact: str | None) -> list[common_pb2.Artifact]:
    if artifact:
        chosen = [a for a in job.artifacts if a.name.rsplit("/", 1)[-1] == artifact or a.filename == artifact or a.name == artifact]
    elif fmt:
        chosen = [a for a in job.artifacts if a.kind == ARTIFACT_KINDS[fmt]]
    else:
        chosen = list(job.artifacts)
    if not chosen:
        raise CliError(f"{job.name} has no matching artifact", EXIT_NOT_FOUND)
    return chosen


def download_all(conn: Connection, artifacts: list[common_pb2.Artifact], out: Path, console: Console, quiet: bool) -> list[Path]:
    """One artifact to a file path `out`, or several into the directory `out`."""
    single_file = len(artifacts) == 1 and not out.is_dir() and not str(out).endswith(os.sep)
    paths = []
    with _progress(console, quiet, transfer=True) as progress:
        for artifact in artifacts:
            dest = out if single_file else out / (artifact.filename or artifact.name.rsplit("/", 1)[-1])
            task = progress.add_task(dest.name, total=artifact.size_bytes)
            paths.append(download_artifact(conn, artifact, dest, lambda n, t=task: progress.advance(t, n)))
    return paths


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_submit(conn: Connection, args: argparse.Namespace, console: Console) -> int:
    path = Path(args.video)
    if not path.is_file():
        raise CliError(f"{path}: no such file", EXIT_NOT_FOUND)
    options = common_pb2.JobOptions(
        formats=[FORMATS[f] for f in args.formats], smoothing=SMOOTHING[args.smoothing] if args.smoothing else 0,
        max_persons=args.max_persons, skip_preview=args.no_preview,
        root_motion=ROOT_MOTION[args.root_motion] if args.root_motion else 0, disable_foot_locking=args.no_foot_locking,
    )
    size = path.stat().st_size
    request_id = args.request_id or str(uuid.uuid4())
    with _progress(console, args.quiet, transfer=True) as progress:
        hashing = progress.add_task("checksum", total=size)
        sha256 = sha256_file(path, progress=lambda n: progress.advance(hashing, n))
        sending = progress.add_task("upload", total=size)
        job = upload_video(conn, path, options=options, request_id=request_id, sha256=sha256,
                           on_offset=lambda n: progress.update(sending, completed=n))
        progress.update(sending, completed=size)
    print(job.name)
    if not args.wait:
        return EXIT_OK
    job = _watch_with_bars(conn, job.name, console, args.quiet)
    code = _report_end(job, console)
    if job.state == common_pb2.JOB_STATE_SUCCEEDED:
        for saved in download_all(conn, list(job.artifacts), Path(args.out), console, args.quiet):
            print(saved)
    return code


def cmd_watch(conn: Connection, args: argparse.Namespace, console: Console) -> int:
    job = _watch_with_bars(conn, job_name(args.job), console, args.quiet, after_seq=args.after_seq)
    return _report_end(job, console)


def cmd_get(conn: Connection, args: argparse.Namespace, console: Console) -> int:
    job = conn.get_job(job_name(args.job))
    if args.json:
        print(json_format.MessageToJson(job))
    else:
        _print_job(job)
    return EXIT_OK


def cmd_list(conn: Connection, args: argparse.Namespace, console: Console) -> int:
    jobs: list[common_pb2.Job] = []
    token = ""
    while len(jobs) < args.limit:
        page = conn.stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=min(args.limit - len(jobs), 1000), page_token=token,
                                                              state=STATES[args.state] if args.state else 0),
                                  metadata=conn.metadata, timeout=UNARY_TIMEOUT_S)
        jobs.extend(page.jobs)
        token = page.next_page_token
        if not token:
            break
    if args.json:
        print(json_format.MessageToJson(gateway_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)))
        return EXIT_OK
    table = Table("job", "state", "progress", "file", "created", "detail", box=None)
    for job in jobs:
        detail = job.error.reason if job.error.reason else (STAGE_LABEL.get(job.stage, "") if job.stage else "")
        table.add_row(job.name, _state(job.state), f"{job.progress:.0%}", job.display_filename,
                      job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"), detail)
    Console().print(table)
    return EXIT_OK


def cmd_cancel(conn: Connection, args: argparse.Namespace, console: Console) -> int:
    job = conn.stub.CancelJob(gateway_pb2.CancelJobRequest(name=job_name(args.job)), metadata=conn.metadata,
                              timeout=UNARY_TIMEOUT_S)
    print(f"{job.name}: {_state(job.state)}")
    return EXIT_OK


def cmd_delete(conn: Connection, args: argparse.Namespace, console: Console) -> int:
    name = job_name(args.job)
    conn.stub.DeleteJob(gateway_pb2.DeleteJobRequest(name=name), metadata=conn.metadata, timeout=UNARY_TIMEOUT_S)
    print(f"{name}: deleted")
    return EXIT_OK


def cmd_download(conn: Connection, args: argparse.Namespace, console: Console) -> int:
    job = conn.get_job(job_name(args.job))
    if job.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise CliError(f"{job.name} is {_state(job.state)}; artifacts are available once it SUCCEEDED", EXIT_USAGE)
    chosen = select_artifacts(job, args.format, args.artifact)
    for saved in download_all(conn, chosen, Path(args.out), console, args.quiet):
        print(saved)
    return EXIT_OK


def _watch_with_bars(conn: Connection, name: str, console: Console, quiet: bool, after_seq: int = 0) -> common_pb2.Job:
    with _progress(console, quiet) as progress:
        bars = StageBars(progress, console)
        return watch_job(conn, name, bars.show, after_seq=after_seq)


def _report_end(job: common_pb2.Job, console: Console) -> int:
    if job.state == common_pb2.JOB_STATE_SUCCEEDED:
        return EXIT_OK
    reason = f" [{job.error.reason}]" if job.error.reason else ""
    console.print(f"{job.name} {_state(job.state)}{reason}: {job.error.message}", markup=False)
    return EXIT_CANCELLED if job.state == common_pb2.JOB_STATE_CANCELLED else EXIT_JOB_FAILED


def _print_job(job: common_pb2.Job) -> None:
    v = job.video
    lines = [
        f"name:      {job.name}",
        f"state:     {_state(job.state)}" + (f" ({STAGE_LABEL.get(job.stage, '')}, {job.progress:.0%})" if job.state == common_pb2.JOB_STATE_RUNNING else ""),
        f"file:      {job.display_filename} ({job.size_bytes} bytes, sha256 {job.sha256})",
        f"video:     {v.width}x{v.height}, {v.frame_count} frames, {v.fps:g} fps, {v.duration_seconds:.2f} s, {v.codec} in {v.container}",
        f"created:   {job.create_time.ToJsonString()}",
    ]
    if job.error.reason:
        lines.append(f"error:     [{job.error.reason}] {job.error.message}")
    for a in job.artifacts:
        lines.append(f"artifact:  {a.name} ({common_pb2.ArtifactKind.Name(a.kind).removeprefix('ARTIFACT_KIND_').lower()}, "
                     f"{a.size_bytes} bytes)")
    print("\n".join(lines))


def _state(state: int) -> str:
    return common_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def _progress(console: Console, quiet: bool, transfer: bool = False) -> Progress:
    columns: list[Any] = [TextColumn("{task.description:<28}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()] if transfer else [TextColumn("{task.percentage:>3.0f}%")]
    return Progress(*columns, console=console, disable=quiet, transient=False)


# ---------------------------------------------------------------------------------------------
# Entry point


def _csv(choices: dict[str, int]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip().lower() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--addr", default=argparse.SUPPRESS, help=f"gateway address [env MOCAP_GATEWAY_ADDR, default {DEFAULT_ADDR}]")
    common.add_argument("--token", default=argparse.SUPPRESS, help="bearer token [env MOCAP_TOKEN]")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    parser = argparse.ArgumentParser(prog="mocap", description="Client of the mocap mesh gateway.", parents=[common],
                                     epilog="Exit codes: 0 ok, 1 job failed, 2 usage/invalid input, 3 not found, "
                                            "4 unavailable/busy, 5 cancelled, 6 authentication, 7 internal/checksum.")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", parents=[common], help="upload a video and create a job")
    submit.add_argument("video")
    submit.add_argument("--formats", type=_csv(FORMATS), default=[], help="comma-separated: bvh,fbx,glb (default: all)")
    submit.add_argument("--smoothing", choices=list(SMOOTHING), help="smoothing preset (default: standard)")
    submit.add_argument("--max-persons", type=int, default=0, help="most people to track, 1..16 (default: 4)")
    submit.add_argument("--no-preview", action="store_true", help="do not render the preview video")
    submit.add_argument("--root-motion", choices=list(ROOT_MOTION), help="root motion (default: path)")
    submit.add_argument("--no-foot-locking", action="store_true", help="do not lock feet in ground contact")
    submit.add_argument("--request-id", default="", help="idempotency key (default: a new UUID)")
    submit.add_argument("--wait", action="store_true", help="watch the job and download its files when it succeeds")
    submit.add_argument("--out", default=".", help="directory for the files with --wait (default: .)")
    submit.set_defaults(run=cmd_submit)

    watch = sub.add_parser("watch", parents=[common], help="follow a job until it ends")
    watch.add_argument("job")
    watch.add_argument("--after-seq", type=int, default=0, help="only events after this seq")
    watch.set_defaults(run=cmd_watch)

    get = sub.add_parser("get", parents=[common], help="show a job")
    get.add_argument("job")
    get.add_argument("--json", action="store_true", help="print the Job as JSON")
    get.set_defaults(run=cmd_get)

    lister = sub.add_parser("list", parents=[common], help="list your jobs, newest first")
    lister.add_argument("--state", choices=list(STATES))
    lister.add_argument("--limit", type=int, default=50, help="most jobs to show (default: 50)")
    lister.add_argument("--json", action="store_true", help="print a ListJobsResponse as JSON")
    lister.set_defaults(run=cmd_list)

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job")
    cancel.set_defaults(run=cmd_cancel)

    delete = sub.add_parser("delete", parents=[common], help="delete an ended job and its files")
    delete.add_argument("job")
    delete.set_defaults(run=cmd_delete)

    download = sub.add_parser("download", parents=[common], help="download a job's files")
    download.add_argument("job")
    which = download.add_mutually_exclusive_group()
    which.add_argument("--format", choices=list(ARTIFACT_KINDS), help="only files of this kind")
    which.add_argument("--artifact", help="only the artifact with this name")
    which.add_argument("--all", action="store_true", help="every file (the default)")
    download.add_argument("--out", required=True, help="file path (one file) or directory")
    download.set_defaults(run=cmd_download)

    track = sub.add_parser("track", help="debug: track a local video with the tracker's pipeline (no services; "
                                         "needs the tracker extra)")
    track.add_argument("video")
    track.add_argument("--out", required=True, help="output .npz with the pose tracks")
    track.add_argument("--max-persons", type=int, default=None, help="people followed at once")
    track.add_argument("--overlay", default=None, help="also write an MP4 with the skeletons drawn")
    track.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    track.set_defaults(run=cmd_track)
    return parser


def cmd_track(conn: "Connection", args: argparse.Namespace, console: Console) -> int:
    """Runs the tracker's own debug command, `python -m tracker_svc track`, as a child process of
    this interpreter and exits with its status. A child rather than an import: the gateway never
    imports another service (a gateway-only install has no torch), so the tracker must come with
    its own extra in this environment, which is checked first for a clear message."""
    if not Path(args.video).is_file():
        raise CliError(f"no such file: {args.video}", EXIT_NOT_FOUND)
    missing = missing_modules(TRACKER_IMPORTS)
    if missing:
        raise CliError(f"`mocap track` runs the tracker here, and this environment lacks {', '.join(missing)}: "
                       f"install the tracker's extra ({TRACKER_INSTALL_HINT})", EXIT_USAGE)
    return _exit_status(subprocess.run(_track_command(args), check=False).returncode)


def _track_command(args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "tracker_svc", "track", args.video, "--out", args.out, "--device", args.device]
    if args.max_persons is not None:
        command += ["--max-persons", str(args.max_persons)]
    if args.overlay is not None:
        command += ["--overlay", args.overlay]
    return command


def _exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: killed by signal N → 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def missing_modules(names: Sequence[str]) -> list[str]:
    """The names among `names` that this interpreter cannot import (looked up, not imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder that refuses the name, or a broken module entry
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    addr = getattr(args, "addr", None) or os.environ.get("MOCAP_GATEWAY_ADDR") or DEFAULT_ADDR
    token = getattr(args, "token", None) or os.environ.get("MOCAP_TOKEN", "")
    args.quiet = getattr(args, "quiet", False)
    console = Console(stderr=True)
    conn = Connection(addr, token)
    try:
        return args.run(conn, args, console)
    except CliError as exc:
        console.print(f"error: {exc}", markup=False)
        return exc.exit_code
    except DownloadError as exc:
        console.print(f"error: {exc}", markup=False)
        return EXIT_INTERNAL
    except grpc.RpcError as exc:
        details = describe_rpc_error(exc)
        message = str(details)
        if details.code == grpc.StatusCode.UNAVAILABLE and not details.reason:
            message = f"cannot reach the gateway at {addr}: {details.message}"
        if details.retry_after_s:
            message += f" (retry in {details.retry_after_s:g} s)"
        if is_message_too_large(details):
            message = ("a message was refused by gRPC's message-size limit (RESOURCE_EXHAUSTED with no reason): "
                       f"this is not a busy gateway, and sending the same again fails again ({details.message})")
            console.print(f"error: {message}", markup=False)
            return EXIT_USAGE
        console.print(f"error: {message}", markup=False)
        return _EXIT_BY_CODE.get(details.code, EXIT_INTERNAL)
    except KeyboardInterrupt:
        console.print("interrupted", markup=False)
        return EXIT_INTERRUPTED
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
