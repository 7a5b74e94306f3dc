"""Two gateway replicas and two trackers sharing the work, one of each killed -9 while jobs run.

All real processes on localhost (tests/e2e/replicas.py starts them): a real PostgreSQL (a fresh
database), one resource broker, two trackers, one smoother, one exporter and two gateways with
their own `--replica-id`, the same `--database-url` and the same `--data-dir`, and both trackers
in their tracker address ("127.0.0.1:P1,127.0.0.1:P2", round robin).

Twelve distinct 2 s clips are submitted, alternating between the gateways. While they run, the
gateway that owns RUNNING jobs (by `jobs.claim_owner`; one with a finished Track if it can be
had) is killed -9, then a tracker in the middle of a Track call (it holds an inference lease). Then:

- 12 of 12 jobs SUCCEEDED;
- every job's events, as watched live through the surviving gateway, have seq exactly 1..N and end
  with SUCCEEDED (and a replay from seq 1 afterwards gives the same events);
- every job the killed gateway owned has a RESUMED event;
- no orphan file under the shared data directory: each job directory holds exactly input.* and
  artifacts/ with exactly the job's artifacts (no upload.part, no temp file, no tracks.*.pb);
- no lease is held past its TTL at the end (the broker's ListLeases);
- no job tracked again after its Track had finished: from the trackers' logs (each Track call logs
  its job), no Track call of a job resumed after TRACK began after its TRACK STAGE_FINISHED event,
  and no job made more Track calls than 1 + its failed attempts (TRACK STAGE_RETRY events and
  RESUMED events with stage UNSPECIFIED).

The summary line (`replicas: ...`) is printed even when pytest captures output.
"""

from __future__ import annotations

import time

import pytest

from mocap.v1 import common_pb2
from tests.e2e.replicas import (
    EV,
    TRACK,
    ReplicaMesh,
    Submitted,
    Watcher,
    event_summary,
    job_dir_problems,
    make_clips,
    other_files,
    replay_events,
    retrack_problems,
    running_jobs,
    seq_problems,
    settle,
    submit,
    track_calls,
)
from tests.pgserver import postgres_server, postgres_url  # noqa: F401  (pytest fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]

JOBS = 12
# The claim TTL is what a takeover waits for: a dead replica's jobs are free between ⅔·TTL and TTL
# after its last heartbeat, and are claimed within one poll after that. The default (10 s) would
# only make the test wait; 4 s still leaves each live replica three heartbeats (every TTL/3 =
# 1.3 s) per TTL on a loaded 2-core machine, so a live replica does not lose its claims.
CLAIM_TTL_S = 4.0
POLL_S = 0.5
LEASE_TTL_S = 4.0  # the trackers' inference leases: a dead tracker's lease is reclaimed within this
JOB_END_TIMEOUT_S = 420.0


def _pick_gateway_to_kill(url: str, gateways: list[str], timeout_s: float = 90.0) -> tuple[str, list[dict]]:
    """Waits for a moment when a gateway owns RUNNING jobs, at best one whose Track has finished
    (completed_stage >= TRACK) so the resume-after-TRACK path is exercised; returns its name and the
    RUNNING jobs then."""
    deadline = time.monotonic() + timeout_s
    fallback_after = time.monotonic() + timeout_s / 3
    while time.monotonic() < deadline:
        rows = running_jobs(url)
        owners = {row["claim_owner"] for row in rows if row["claim_owner"] in gateways}
        past_track = [row["claim_owner"] for row in rows if row["completed_stage"] >= TRACK and row["claim_owner"] in gateways]
        # Both kinds at once if possible: a job past TRACK and one still before it, on the same replica.
        for owner in past_track:
            if any(r["claim_owner"] == owner and r["completed_stage"] < TRACK for r in rows):
                return owner, rows
        if past_track and time.monotonic() > fallback_after:
            return past_track[0], rows
        if owners and time.monotonic() > deadline - timeout_s / 3:
            return sorted(owners)[0], rows
        time.sleep(0.05)
    raise AssertionError(f"no gateway owned a RUNNING job within {timeout_s:.0f} s")


def _busy_tracker(mesh: ReplicaMesh, timeout_s: float = 120.0) -> tuple[str, str]:
    """Waits until a tracker is inside a Track call (holds an inference lease); its name and the job."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name in mesh.tracker_names:
            job = mesh.tracker_busy(name)
            if job:
                time.sleep(0.2)  # into the call: past the lease grant, decoding and inferring
                if mesh.tracker_busy(name):
                    return name, job
        time.sleep(0.05)
    raise AssertionError(f"no tracker was inside a Track call within {timeout_s:.0f} s")


def test_two_gateways_two_trackers_survive_kill9(tmp_path, postgres_url, capsys):  # noqa: F811
    started = time.monotonic()
    clips = make_clips(tmp_path / "clips", JOBS, seconds=2.0)
    mesh = ReplicaMesh(tmp_path / "mesh", postgres_url, gateways=2, trackers=2, claim_ttl_s=CLAIM_TTL_S,
                       poll_s=POLL_S, lease_ttl_s=LEASE_TTL_S)
    jobs: list[Submitted] = []
    summary = "replicas: did not get to the end"
    try:
        mesh.start_all()
        gateways = mesh.gateway_names
        for index, clip in enumerate(clips):
            via = gateways[index % 2]
            name = submit(mesh.address(via), clip, request_id=f"replicas-{index}")
            job = Submitted(name, clip, via)
            # Watched live through both gateways from seq 1; the killed one's watchers are dropped.
            job.watchers = {g: Watcher(mesh.address(g), name).start() for g in gateways}
            jobs.append(job)

        victim, running_at_kill = _pick_gateway_to_kill(postgres_url, gateways)
        gateway_killed_at = mesh.kill(victim)
        survivor = next(g for g in gateways if g != victim)
        for job in jobs:
            job.watchers[victim].stop()
        # Read after the kill: the dead replica cannot change them any more.
        owned = {row["job_id"]: row["completed_stage"] for row in running_jobs(postgres_url)
                 if row["claim_owner"] == victim}
        tracker_victim, tracker_job = _busy_tracker(mesh)
        tracker_killed_at = mesh.kill(tracker_victim)

        watched = {job.job_id: job.watchers[survivor] for job in jobs}
        for watcher in watched.values():
            watcher.wait(max(1.0, JOB_END_TIMEOUT_S - (time.monotonic() - started)))
        elapsed = time.monotonic() - started

        # --- what the jobs say ----------------------------------------------------------------
        problems: list[str] = []
        finals = {job_id: w.final for job_id, w in watched.items()}
        states = {job_id: common_pb2.JobState.Name(f.state) if f else "NOT ENDED" for job_id, f in finals.items()}
        for job_id, state in states.items():
            if state != "JOB_STATE_SUCCEEDED":
                final = finals[job_id]
                problems.append(f"{job_id}: {state} {final.error.reason if final else ''} {final.error.message if final else ''}"
                                f"; events: {[event_summary(e) for e in watched[job_id].received if e.type != EV.JOB_EVENT_TYPE_STAGE_PROGRESS]}")
        for job_id, watcher in watched.items():
            problems += [f"{job_id} (live through {survivor}): {p}" for p in seq_problems(watcher.received)]
            problems += [f"{job_id}: watch error {e}" for e in watcher.errors]
            problems += [f"{job_id} (live through {survivor}): {e}" for e in watcher.ended_early]
            replayed = replay_events(mesh.address(survivor), f"jobs/{job_id}")
            if [e.SerializeToString() for e in replayed] != [e.SerializeToString() for e in watcher.received]:
                problems.append(f"{job_id}: the replay from seq 1 ({[e.seq for e in replayed]}) differs from what was "
                                f"watched live ({[e.seq for e in watcher.received]})")
        resumed = {job_id: [e for e in w.received if e.type == EV.JOB_EVENT_TYPE_RESUMED] for job_id, w in watched.items()}
        for job_id in owned:
            if not resumed.get(job_id):
                problems.append(f"{job_id}: owned by the killed {victim} (completed_stage {owned[job_id]}) but no RESUMED event")
        unexpected = [job_id for job_id, events in resumed.items() if events and job_id not in owned]
        problems += [f"{job_id}: RESUMED but not owned by {victim} when it was killed" for job_id in unexpected]

        # --- Track calls ----------------------------------------------------------------------
        calls = track_calls({name: mesh.log_path(name) for name in mesh.tracker_names})
        tallies = {}
        for job_id, watcher in watched.items():
            tallies[job_id], found = retrack_problems(job_id, watcher.received, calls.get(job_id, []))
            problems += found

        # --- files and leases (nothing runs now) ----------------------------------------------
        ended = [w.final for w in watched.values() if w.final is not None]
        # A job's tracks are removed just after its SUCCEEDED is stored: give that a moment.
        problems += settle(lambda: job_dir_problems(mesh.data_dir, ended), timeout_s=10.0)
        problems += [f"unexpected in the data directory: {p}" for p in other_files(mesh.data_dir)]
        problems += [f"lease held past its TTL: {p}" for p in mesh.leases_past_ttl()]

        takeovers = sum(len(events) for events in resumed.values())
        retries = sum(t.retries for t in tallies.values())
        exact = sum(t.calls == t.most for t in tallies.values())
        succeeded = sum(s == "JOB_STATE_SUCCEEDED" for s in states.values())
        summary = (f"replicas: jobs={succeeded}/{JOBS} succeeded, takeovers={takeovers} (killed {victim} owning "
                   f"{len(owned)} RUNNING: {sorted(owned.values())} completed stages; {len(running_at_kill)} RUNNING in all), "
                   f"track retries={retries} (killed {tracker_victim} in the Track of {tracker_job}), "
                   f"track calls={sum(t.calls for t in tallies.values())} ({exact}/{JOBS} jobs exactly 1 + failed attempts), "
                   f"survivor watch reconnects={sum(w.reconnects for w in watched.values())}, "
                   f"kill→kill {tracker_killed_at - gateway_killed_at:.1f} s, seconds={elapsed:.1f}")
        assert not problems, "\n".join([summary, *problems])
    finally:
        for job in jobs:
            for watcher in job.watchers.values():
                watcher.stop()
        stop_problems = mesh.stop_all()
        with capsys.disabled():
            print(f"\n{summary}", flush=True)
    assert not stop_problems, stop_problems
