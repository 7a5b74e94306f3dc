"""A mesh with several gateway replicas and several trackers, all real processes on localhost:
the harness of tests/e2e/test_replicas.py and bench/bench_replicas.py.

    with PostgresServer() as pg, ReplicaMesh(root, pg.create_database(), gateways=2, trackers=2) as mesh:
        clips = make_clips(root / "clips", 12)
        name = submit(mesh.gateway_address(0), clips[0], request_id="r-1")
        watcher = Watcher(mesh.gateway_address(1), name).start()
        job = watcher.wait()

What runs: one resource broker (CPU devices), N trackers (each its own spool dir, all leasing
from the broker), one smoother, one exporter, and M gateways sharing one PostgreSQL database
(`--database-url`) and ONE data directory (`--data-dir`, what a network volume is between
machines), each with its own `--replica-id` and the tracker list "ip:port,ip:port" (round robin).
Every service logs JSON lines to `logs/<name>.log` (a restarted one appends to the same file), so
the checks can read what each did.

`ReplicaMesh.stop()` (and the `with` block's end, on every path) stops every process it started:
SIGTERM, then SIGKILL of the process group; one that fails to stop does not keep the others up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from gateway.client import Connection, upload_video
from mocap.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, resource_pb2, resource_pb2_grpc
from mocap_common.files import sha256_file
from tests.support import REPO, RUNNER_MP4, ServiceProcess, free_port

TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
TRACK_RPC = "/mocap.v1.TrackerService/Track"
TRACK, SMOOTH, EXPORT = common_pb2.JOB_STAGE_TRACK, common_pb2.JOB_STAGE_SMOOTH, common_pb2.JOB_STAGE_EXPORT
EV = gateway_pb2  # JOB_EVENT_TYPE_* live here
_TRANSPORT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}


# --- clips -------------------------------------------------------------------------------------

def make_clips(dest: Path, count: int, *, seconds: float = 1.5, height: int = 480, span_s: float = 4.4) -> list[Path]:
    """`count` distinct clips of the runner (`seconds` long, scaled to `height` lines), cut at start
    offsets spread over the first `span_s` seconds of the 6 s clip, so no two have the same bytes
    (the gateway's content dedup would answer a second one with the first job)."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is needed to cut the clips (Debian's ffmpeg; .ci/run installs it)")
    clips = []
    for i in range(count):
        offset = span_s * i / max(1, count - 1)
        out = dest / f"runner-{i:02d}.mp4"
        if not out.exists():
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", f"{offset:.3f}", "-i", str(RUNNER_MP4), "-t", f"{seconds:.3f}",
                            "-vf", f"scale=-2:{height}", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                            "-movflags", "+faststart", "-an", str(out)], check=True, timeout=120)
        clips.append(out)
    digests = {sha256_file(p) for p in clips}
    if len(digests) != len(clips):
        raise RuntimeError(f"the {count} clips are not all distinct ({len(digests)} distinct)")
    return clips


# --- the store ---------------------------------------------------------------------------------

def db_fetch(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Runs one query on the gateways' PostgreSQL database (a connection of its own); the rows."""
    import asyncpg

    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return [dict(row) for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def running_jobs(url: str) -> list[dict[str, Any]]:
    """Every RUNNING job's job_id, claim_owner (the replica executing it, by the store), claims and
    completed_stage (the last stage whose output is stored: 0 none, 1 TRACK, 2 SMOOTH)."""
    return db_fetch(url, "SELECT job_id, claim_owner, claims, completed_stage FROM jobs WHERE state = 'RUNNING'"
                         " ORDER BY job_id")


# --- the mesh ----------------------------------------------------------------------------------

class ReplicaMesh:
    """Broker, `trackers` trackers, smoother, exporter and `gateways` gateway replicas."""

    def __init__(self, root: Path, database_url: str, *, gateways: int = 2, trackers: int = 2,
                 claim_ttl_s: float = 4.0, poll_s: float = 0.5, lease_ttl_s: float = 4.0,
                 gateway_args: Sequence[str] = (), tracker_args: Sequence[str] = (), max_active_jobs: int = 64) -> None:
        self.root = root
        self.database_url = database_url
        self.claim_ttl_s = claim_ttl_s
        self.poll_s = poll_s
        self.lease_ttl_s = lease_ttl_s
        self.data_dir = root / "gateway-data"  # the one data directory every gateway shares
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Children get none of the caller's MOCAP_* settings: only what is passed here.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MOCAP_")}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.names = {"resource": ["resource"], "tracker": [f"tracker-{i}" for i in range(trackers)],
                      "smoother": ["smoother"], "exporter": ["exporter"],
                      "gateway": [f"gateway-{chr(ord('a') + i)}" for i in range(gateways)]}
        self.ports = {name: free_port() for names in self.names.values() for name in names}
        self.services: dict[str, ServiceProcess] = {}
        checkpoints = REPO / "data" / "smoother" / "checkpoints"
        self.checkpoints = root / "smoother" / "checkpoints"
        if checkpoints.is_dir() and not self.checkpoints.exists():  # what `make setup` trained
            shutil.copytree(checkpoints, self.checkpoints)
        self._gateway_args = list(gateway_args)
        self._tracker_args = list(tracker_args)
        self._max_active_jobs = max_active_jobs

    # addresses
    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def gateway_names(self) -> list[str]:
        return self.names["gateway"]

    @property
    def tracker_names(self) -> list[str]:
        return self.names["tracker"]

    def gateway_address(self, index: int) -> str:
        return self.address(self.gateway_names[index])

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def _spec(self, name: str) -> tuple[str, list[str], dict[str, str]]:
        broker = {"MOCAP_RESOURCE_ADDR": self.address("resource")}
        if name == "resource":
            return "resource_svc", ["--db-path", str(self.root / "resource" / "leases.sqlite3"), "--inventory", "cpu"], {}
        if name.startswith("tracker-"):
            return "tracker_svc", ["--spool-dir", str(self.root / name / "spool"), "--lease-ttl-s", str(self.lease_ttl_s),
                                   *self._tracker_args], broker
        if name == "smoother":
            return "smoother_svc", ["--checkpoint-dir", str(self.checkpoints)], broker
        if name == "exporter":
            return "exporter_svc", ["--work-dir", str(self.root / "exporter" / "work")], {}
        trackers = ",".join(self.address(t) for t in self.tracker_names)
        return "gateway", ["--data-dir", str(self.data_dir), "--database-url", self.database_url, "--replica-id", name,
                           "--job-claim-ttl-s", str(self.claim_ttl_s), "--job-poll-s", str(self.poll_s),
                           "--tracker-addr", trackers, "--smoother-addr", self.address("smoother"),
                           "--exporter-addr", self.address("exporter"),
                           "--max-active-jobs-per-tenant", str(self._max_active_jobs), *self._gateway_args], {}

    # lifecycle
    def start(self, name: str, wait: bool = True) -> ServiceProcess:
        module, args, env = self._spec(name)
        service = ServiceProcess(module, [*args, "--log-format", "json"], port=self.ports[name],
                                 log_path=self.log_path(name), ready_timeout_s=180.0)
        service.env = {**self.env, **env}
        self.services[name] = service
        return service.start(wait=wait)

    def start_all(self) -> "ReplicaMesh":
        try:
            self.start("resource")
            for name in (*self.tracker_names, "smoother", "exporter"):
                self.start(name, wait=False)  # these load models: let them do it side by side
            for name in (*self.tracker_names, "smoother", "exporter"):
                self._wait(name)
            for name in self.gateway_names:
                self.start(name)
        except BaseException:
            self.stop_all()
            raise
        return self

    def _wait(self, name: str) -> None:
        from tests.support import wait_serving

        service = self.services[name]
        try:
            wait_serving(service.address, service.ready_timeout_s)
        except TimeoutError:
            service.kill()
            raise TimeoutError(f"{name} did not become SERVING; log:\n{service.log_text()[-4000:]}") from None

    def kill(self, name: str) -> float:
        """SIGKILL (process group, as a crash would); returns time.time() of the kill."""
        killed_at = time.time()
        self.services[name].kill()
        return killed_at

    def alive(self, name: str) -> bool:
        service = self.services.get(name)
        return service is not None and service.proc is not None and service.proc.poll() is None

    def stop_all(self) -> list[str]:
        """Stops every process (gateways first, broker last); returns what went wrong, if anything."""
        problems = []
        order = [*self.gateway_names, "exporter", "smoother", *self.tracker_names, "resource"]
        for name in order:
            service = self.services.get(name)
            if service is None or service.proc is None:
                continue
            try:
                service.stop()
            except BaseException as exc:  # noqa: BLE001 - the next ones must stop all the same
                problems.append(f"{name}: {exc!r}")
                try:
                    service.kill()
                except BaseException:  # noqa: BLE001
                    pass
        return problems

    def __enter__(self) -> "ReplicaMesh":
        return self.start_all()

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # broker
    def active_leases(self) -> list[resource_pb2.Lease]:
        with grpc.insecure_channel(self.address("resource")) as channel:
            stub = resource_pb2_grpc.ResourceServiceStub(channel)
            return list(stub.ListLeases(resource_pb2.ListLeasesRequest(state=resource_pb2.LEASE_STATE_ACTIVE,
                                                                        page_size=1000), timeout=10).leases)

    def tracker_busy(self, name: str) -> str:
        """The job a tracker holds an inference lease for now (it is inside a Track call), or ""."""
        pid = self.services[name].pid
        for lease in self.active_leases():
            if lease.holder.service == "tracker" and lease.holder.pid == pid:
                return lease.holder.job or "?"
        return ""

    def leases_past_ttl(self, settle_s: float | None = None) -> list[str]:
        """With nothing running: leases still ACTIVE once every TTL (+1 s) has had time to pass."""
        deadline = time.monotonic() + (self.lease_ttl_s + 1.0 if settle_s is None else settle_s)
        while True:
            active = self.active_leases()
            if not active:
                return []
            if time.monotonic() > deadline:
                return [f"{lease.name} on {lease.device} held by {lease.holder.service} pid {lease.holder.pid} for {lease.holder.job}, "
                        f"expires {lease.expire_time.ToDatetime().isoformat()}" for lease in active]
            time.sleep(0.2)


# --- jobs --------------------------------------------------------------------------------------

def submit(address: str, clip: Path, *, request_id: str | None = None,
           options: common_pb2.JobOptions | None = None) -> str:
    """Uploads `clip` through the gateway at `address` (the client library: resumes, retries); the job's name."""
    conn = Connection(address, "")
    try:
        return upload_video(conn, clip, options=options or common_pb2.JobOptions(), request_id=request_id or uuid.uuid4().hex,
                            sha256=sha256_file(clip)).name
    finally:
        conn.close()


def get_job(address: str, name: str) -> common_pb2.Job:
    with grpc.insecure_channel(address) as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).GetJob(gateway_pb2.GetJobRequest(name=name), timeout=10)


def delete_job(address: str, name: str) -> None:
    with grpc.insecure_channel(address) as channel:
        gateway_pb2_grpc.GatewayServiceStub(channel).DeleteJob(gateway_pb2.DeleteJobRequest(name=name), timeout=30)


def replay_events(address: str, name: str) -> list[gateway_pb2.JobEvent]:
    """Every stored event of an ended job, from seq 1 (WatchJob on a terminal job replays and ends)."""
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        return list(stub.WatchJob(gateway_pb2.WatchJobRequest(name=name), timeout=30))


class Watcher:
    """Follows one job's events through one gateway in a thread, as a client would: from seq 1 and,
    after a broken stream, again from the last seq seen (each such reconnect is counted).
    `received` holds every event as it arrived, with `arrived` the wall-clock time of each."""

    def __init__(self, address: str, name: str, *, reconnect_for_s: float = 120.0) -> None:
        self.address = address
        self.name = name
        self.received: list[gateway_pb2.JobEvent] = []
        self.arrived: list[float] = []
        self.reconnects = 0
        self.errors: list[str] = []
        self.ended_early: list[str] = []  # streams that ended OK before the job's terminal event
        self.final: common_pb2.Job | None = None
        self._reconnect_for_s = reconnect_for_s
        self._stop = threading.Event()
        self._done = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch {name}", daemon=True)

    def start(self) -> "Watcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(10)

    def wait(self, timeout_s: float) -> common_pb2.Job | None:
        self._done.wait(timeout_s)
        return self.final

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def first(self, kind: int, stage: int | None = None) -> tuple[gateway_pb2.JobEvent, float] | None:
        for event, at in zip(self.received, self.arrived, strict=True):
            if event.type == kind and (stage is None or event.stage == stage):
                return event, at
        return None

    def _run(self) -> None:
        after, broken_since = 0, None
        try:
            with grpc.insecure_channel(self.address) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                while not self._stop.is_set():
                    try:
                        self._call = stub.WatchJob(gateway_pb2.WatchJobRequest(name=self.name, after_seq=after))
                        for event in self._call:
                            self.received.append(event)
                            self.arrived.append(time.time())
                            after, broken_since = event.seq, None
                            if event.type == EV.JOB_EVENT_TYPE_STATE_CHANGED and event.state in TERMINAL:
                                self.final = event.job
                                return
                        # The stream ended (OK) without a terminal event: WatchJob does that only
                        # for a job whose end the client has seen. Noted, then done as a client does.
                        job = stub.GetJob(gateway_pb2.GetJobRequest(name=self.name), timeout=10)
                        self.ended_early.append(f"a WatchJob stream ended OK without the terminal event, after "
                                                f"#{after}; GetJob then said {common_pb2.JobState.Name(job.state)}")
                        if job.state in TERMINAL:
                            self.final = job
                            return
                    except grpc.RpcError as exc:
                        if self._stop.is_set():
                            return
                        if exc.code() not in _TRANSPORT:
                            self.errors.append(f"{exc.code().name}: {exc.details()}")
                            return
                        broken_since = broken_since or time.monotonic()
                        if time.monotonic() - broken_since > self._reconnect_for_s:
                            self.errors.append(f"no stream for {self._reconnect_for_s:.0f} s: {exc.code().name}")
                            return
                    self.reconnects += 1
                    time.sleep(0.3)
        finally:
            self._done.set()


def seq_problems(events: Sequence[gateway_pb2.JobEvent]) -> list[str]:
    """What is wrong with a job's event sequence: seq not exactly 1..N, or not ending SUCCEEDED."""
    problems = []
    seqs = [e.seq for e in events]
    if seqs != list(range(1, len(seqs) + 1)):
        dupes = sorted({s for s in seqs if seqs.count(s) > 1})
        missing = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
        problems.append(f"seq not 1..{len(seqs)}: duplicates {dupes}, missing {missing}, order {seqs}")
    last = events[-1] if events else None
    if last is None or last.type != EV.JOB_EVENT_TYPE_STATE_CHANGED or last.state != common_pb2.JOB_STATE_SUCCEEDED:
        problems.append("does not end with SUCCEEDED: last event "
                        + (f"{gateway_pb2.JobEventType.Name(last.type)} {common_pb2.JobState.Name(last.state)} {last.message!r}"
                           if last else "none"))
    return problems


def event_summary(event: gateway_pb2.JobEvent) -> str:
    kind = gateway_pb2.JobEventType.Name(event.type).removeprefix("JOB_EVENT_TYPE_")
    stage = common_pb2.JobStage.Name(event.stage).removeprefix("JOB_STAGE_")
    return f"#{event.seq} {kind} {stage} {common_pb2.JobState.Name(event.state).removeprefix('JOB_STATE_')} {event.message[:120]}"


# --- logs --------------------------------------------------------------------------------------

def log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a service's log (lines that are not JSON — a traceback — are skipped)."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def _ts(record: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


@dataclass
class TrackCall:
    """One Track call a tracker served (or was serving when it died)."""

    tracker: str
    job_id: str
    started: float  # wall-clock time the call began (its end minus its latency; for an unfinished
    # call the lease grant logged inside it)
    code: str  # the call's status, "" when the tracker died in it (no end line)


def track_calls(logs: dict[str, Path]) -> dict[str, list[TrackCall]]:
    """job_id → the Track calls the trackers' logs show for it. A call is its `rpc` line (logged at
    its end with `job`, `code` and `latency_ms`); a call the tracker died in has only its
    `inference lease held` line, counted when no end line of that job follows it in that log."""
    calls: dict[str, list[TrackCall]] = defaultdict(list)
    for tracker, path in logs.items():
        open_calls: dict[str, list[float]] = defaultdict(list)
        for record in log_records(path):
            job = str(record.get("job", "")).removeprefix("jobs/")
            if not job:
                continue
            if record.get("event") == "inference lease held":
                open_calls[job].append(_ts(record))
            elif record.get("event") == "rpc" and record.get("rpc") == TRACK_RPC:
                started = _ts(record) - float(record.get("latency_ms", 0)) / 1000
                if open_calls[job]:
                    open_calls[job].pop(0)
                calls[job].append(TrackCall(tracker, job, started, str(record.get("code", ""))))
        for job, starts in open_calls.items():
            calls[job] += [TrackCall(tracker, job, at, "") for at in starts]
    for job_calls in calls.values():
        job_calls.sort(key=lambda c: c.started)
    return dict(calls)


def grep_log(path: Path, event: str) -> list[dict[str, Any]]:
    return [r for r in log_records(path) if r.get("event") == event]


# --- files -------------------------------------------------------------------------------------

def job_dir_problems(data_dir: Path, jobs: Iterable[common_pb2.Job]) -> list[str]:
    """Each ended job's directory holds exactly input.<ext> and artifacts/ with exactly its
    artifacts (no upload.part, no temp file, no tracks.*.pb), and no directory under jobs/
    belongs to no job."""
    problems = []
    jobs_root = data_dir / "jobs"
    by_id = {job.name.removeprefix("jobs/"): job for job in jobs}
    present = {p.name for p in jobs_root.iterdir()} if jobs_root.is_dir() else set()
    problems += [f"jobs/{name}: a directory of no job" for name in sorted(present - set(by_id))]
    problems += [f"jobs/{name}: no directory" for name in sorted(set(by_id) - present)]
    for job_id in sorted(set(by_id) & present):
        job_dir = jobs_root / job_id
        entries = sorted(p.name for p in job_dir.iterdir())
        inputs = [e for e in entries if e.startswith("input.")]
        extra = [e for e in entries if e not in ("artifacts", *inputs)]
        if len(inputs) != 1:
            problems.append(f"jobs/{job_id}: {len(inputs)} input files ({inputs})")
        if extra:
            problems.append(f"jobs/{job_id}: unexpected {extra}")
        if "artifacts" not in entries:
            problems.append(f"jobs/{job_id}: no artifacts/")
            continue
        on_disk = sorted(str(p.relative_to(job_dir / "artifacts")) for p in (job_dir / "artifacts").rglob("*"))
        wanted = sorted(a.name.rsplit("/", 1)[-1] for a in by_id[job_id].artifacts)
        if on_disk != wanted:
            problems.append(f"jobs/{job_id}/artifacts: {on_disk} on disk, the job lists {wanted}")
    return problems


def other_files(data_dir: Path) -> list[str]:
    """Anything under the shared data directory besides jobs/ (with PostgreSQL: nothing but jobs/)."""
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.iterdir() if p.name != "jobs") if data_dir.is_dir() else []


# --- figures -----------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


@dataclass
class Submitted:
    """A job this harness submitted, and the watchers that follow it."""

    name: str
    clip: Path
    via: str  # the gateway it was uploaded through
    watchers: dict[str, Watcher] = field(default_factory=dict)  # gateway name → its watcher

    @property
    def job_id(self) -> str:
        return self.name.removeprefix("jobs/")


# --- checks ------------------------------------------------------------------------------------

def event_time(event: gateway_pb2.JobEvent) -> float:
    return event.time.ToMicroseconds() / 1e6


@dataclass
class TrackTally:
    """What a job's events say about its Track attempts, beside the Track calls the trackers logged."""

    calls: int  # Track calls the trackers' logs show for the job
    retries: int  # STAGE_RETRY events of TRACK (a Track attempt that failed UNAVAILABLE)
    resumed_before_track: int  # RESUMED events with stage UNSPECIFIED (the Track in flight, if any, starts over)
    resumed_after_track: int  # RESUMED events with stage >= TRACK (a finished Track must not run again)

    @property
    def most(self) -> int:
        """The most Track calls the job may have made: its first, one more per failed attempt."""
        return 1 + self.retries + self.resumed_before_track


def retrack_problems(job_id: str, events: Sequence[gateway_pb2.JobEvent],
                     calls: Sequence[TrackCall]) -> tuple[TrackTally, list[str]]:
    """No job tracked twice after its Track had finished: for each RESUMED event whose stage is
    TRACK or later, no Track call of the job began after the TRACK STAGE_FINISHED event before it;
    and no job made more Track calls than 1 + its failed attempts (TRACK STAGE_RETRY events and
    RESUMED events with stage UNSPECIFIED)."""
    tally = TrackTally(
        calls=len(calls),
        retries=sum(e.type == EV.JOB_EVENT_TYPE_STAGE_RETRY and e.stage == TRACK for e in events),
        resumed_before_track=sum(e.type == EV.JOB_EVENT_TYPE_RESUMED and e.stage < TRACK for e in events),
        resumed_after_track=sum(e.type == EV.JOB_EVENT_TYPE_RESUMED and e.stage >= TRACK for e in events))
    problems = []
    if not calls:
        problems.append(f"{job_id}: no Track call in the trackers' logs")
    if tally.calls > tally.most:
        problems.append(f"{job_id}: {tally.calls} Track calls ({[(c.tracker, c.code) for c in calls]}) but at most "
                        f"{tally.most} attempts (1 + {tally.retries} retries + {tally.resumed_before_track} resumes before TRACK)")
    for resumed in (e for e in events if e.type == EV.JOB_EVENT_TYPE_RESUMED and e.stage >= TRACK):
        finished = [e for e in events if e.type == EV.JOB_EVENT_TYPE_STAGE_FINISHED and e.stage == TRACK
                    and e.seq < resumed.seq]
        if not finished:
            problems.append(f"{job_id}: RESUMED #{resumed.seq} after stage {resumed.stage} but no TRACK STAGE_FINISHED before it")
            continue
        done_at = event_time(finished[-1])
        late = [c for c in calls if c.started > done_at]
        if late:
            problems.append(f"{job_id}: tracked again after its Track finished (#{finished[-1].seq} at {done_at:.3f}) "
                            f"and was resumed after it (#{resumed.seq}): "
                            + ", ".join(f"{c.tracker} at +{c.started - done_at:.2f} s ({c.code or 'died'})" for c in late))
    return tally, problems


def settle(check: "Any", timeout_s: float, interval_s: float = 0.25) -> list[str]:
    """Calls `check()` (a list of problems) until it returns none or `timeout_s` passes; the last list."""
    deadline = time.monotonic() + timeout_s
    while True:
        problems = check()
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(interval_s)
