"""Replicas: jobs per minute through one vs two gateways and one vs two trackers, and the takeover
latency of a gateway killed with -9 (kill → RESUMED event → SUCCEEDED).

All real processes (tests/e2e/replicas.py: broker, trackers, smoother, exporter, gateways on one
real PostgreSQL and one data directory), short distinct clips cut from the bundled runner. The
reference is the embedded default in the same run: one gateway on SQLite with one tracker.

On a 2-core machine every replica shares the same two cores, so the throughput ratios show what
replication costs (claims, heartbeats, LISTEN/NOTIFY, round robin), not the speedup that more
machines give. Takeover latency is bounded by the claim TTL (a dead replica's jobs are free
between ⅔·TTL and TTL after its last heartbeat) plus one poll interval; it is reported against
the TTL used.

    python -m bench.bench_replicas [--quick]      (or: make bench)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_result
from mocap.v1 import common_pb2, gateway_pb2
from tests.e2e.replicas import ReplicaMesh, Watcher, make_clips, percentile, running_jobs, submit
from tests.pgserver import PostgresServer, available

CLAIM_TTL_S = 4.0
POLL_S = 0.5
CONFIGS = ((1, 1), (2, 1), (1, 2), (2, 2))  # (gateways, trackers)


def _run_jobs(mesh: ReplicaMesh, clips: list[Path], timeout_s: float = 900.0) -> tuple[float, int]:
    """Submits every clip round robin over the gateways, waits for all; (seconds, succeeded)."""
    started = time.monotonic()
    watchers = []
    for index, clip in enumerate(clips):
        address = mesh.gateway_address(index % len(mesh.gateway_names))
        name = submit(address, clip)
        watchers.append(Watcher(address, name).start())
    finals = [w.wait(max(1.0, timeout_s - (time.monotonic() - started))) for w in watchers]
    elapsed = time.monotonic() - started
    for watcher in watchers:
        watcher.stop()
    return elapsed, sum(f is not None and f.state == common_pb2.JOB_STATE_SUCCEEDED for f in finals)


def throughput(server: PostgresServer | None, root: Path, clips: list[Path]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    runs: list[tuple[str, str, int, int]] = [("sqlite 1 gateway + 1 tracker (reference)", "", 1, 1)]
    if server is not None:
        runs += [(f"postgresql {g} gateway{'s' if g > 1 else ''} + {t} tracker{'s' if t > 1 else ''}", "pg", g, t)
                 for g, t in CONFIGS]
    for label, store, gateways, trackers in runs:
        url = server.create_database() if store else ""
        mesh = ReplicaMesh(root / f"tp-{len(results)}", url, gateways=gateways, trackers=trackers,
                           claim_ttl_s=CLAIM_TTL_S, poll_s=POLL_S)
        try:
            mesh.start_all()
            seconds, succeeded = _run_jobs(mesh, clips)
        finally:
            mesh.stop_all()
            if url and server is not None:
                server.drop_database(url)
        results[label] = {"jobs": len(clips), "succeeded": succeeded, "seconds": round(seconds, 2),
                          "jobs_per_min": round(60.0 * succeeded / seconds, 2)}
        print(f"  {label:45s} {succeeded}/{len(clips)} in {seconds:6.1f} s = {results[label]['jobs_per_min']:.2f} jobs/min",
              flush=True)
    reference = next(iter(results.values()))["jobs_per_min"]
    for figures in results.values():
        figures["ratio_to_reference"] = round(figures["jobs_per_min"] / reference, 3) if reference else 0.0
    return results


def _owner_of(url: str, job_id: str, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for row in running_jobs(url):
            if row["job_id"] == job_id and row["claim_owner"]:
                return row["claim_owner"]
        time.sleep(0.05)
    raise RuntimeError(f"{job_id} was not claimed within {timeout_s:.0f} s")


def takeovers(server: PostgresServer, root: Path, clips: list[Path]) -> dict[str, object]:
    """Kills the gateway running a job, once per clip; kill → RESUMED and kill → SUCCEEDED."""
    url = server.create_database()
    mesh = ReplicaMesh(root / "takeover", url, gateways=2, trackers=1, claim_ttl_s=CLAIM_TTL_S, poll_s=POLL_S)
    to_resumed: list[float] = []
    to_succeeded: list[float] = []
    failed = 0
    try:
        mesh.start_all()
        for index, clip in enumerate(clips):
            name = submit(mesh.gateway_address(index % 2), clip)
            owner = _owner_of(url, name.removeprefix("jobs/"))
            other = next(g for g in mesh.gateway_names if g != owner)
            watcher = Watcher(mesh.address(other), name).start()
            time.sleep(0.5)  # into the job's first stage
            killed_at = mesh.kill(owner)
            final = watcher.wait(300.0)
            resumed = watcher.first(gateway_pb2.JOB_EVENT_TYPE_RESUMED)
            if final is None or final.state != common_pb2.JOB_STATE_SUCCEEDED or resumed is None:
                failed += 1
            else:
                to_resumed.append(resumed[1] - killed_at)
                to_succeeded.append(watcher.arrived[-1] - killed_at)
                print(f"  kill {index + 1:2d}: {owner} killed → RESUMED on {other} after {to_resumed[-1]:5.2f} s, "
                      f"SUCCEEDED after {to_succeeded[-1]:5.2f} s", flush=True)
            watcher.stop()
            mesh.start(owner)  # back for the next round
    finally:
        mesh.stop_all()
        server.drop_database(url)

    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        return {"p50_s": round(statistics.median(values), 3), "p99_s": round(percentile(values, 99), 3),
                "max_s": round(max(values), 3), "min_s": round(min(values), 3)}

    return {"kills": len(clips), "failed": failed, "claim_ttl_s": CLAIM_TTL_S, "poll_s": POLL_S,
            "kill_to_resumed": stats(to_resumed), "kill_to_succeeded": stats(to_succeeded),
            "kill_to_resumed_over_ttl_p50": round(statistics.median(to_resumed) / CLAIM_TTL_S, 3) if to_resumed else None}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 jobs per configuration and 10 kills (the minimum)")
    args = parser.parse_args(argv)
    jobs, kills = (4, 10) if args.quick else (8, 12)
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        root = Path(tmp)
        clips = make_clips(root / "clips", max(jobs, kills), seconds=1.5)
        print(f"throughput: {jobs} jobs of 1.5 s 480p clips per configuration (claim TTL {CLAIM_TTL_S:g} s)", flush=True)
        if not available():
            print("no PostgreSQL installed: only the SQLite reference runs", flush=True)
            results = {"throughput": throughput(None, root, clips[:jobs])}
        else:
            with PostgresServer() as server:
                results = {"throughput": throughput(server, root, clips[:jobs])}
                print(f"takeover: {kills} kills -9 of the gateway running a job (2 gateways, 1 tracker)", flush=True)
                results["takeover"] = takeovers(server, root, clips[:kills])
    results["note"] = ("2-core machine: every replica shares the same cores, so the throughput ratios show the "
                       "overhead of replication, not the speedup of more machines")
    for label, figures in results["throughput"].items():
        print(f"  {label:45s} ×{figures['ratio_to_reference']:.2f} of the reference")
    take = results.get("takeover")
    if take:
        print(f"  takeover kill → RESUMED: {take['kill_to_resumed']} (TTL {CLAIM_TTL_S:g} s, poll {POLL_S:g} s); "
              f"kill → SUCCEEDED: {take['kill_to_succeeded']}; failed {take['failed']}/{take['kills']}")
    print(results["note"])
    write_result("replicas", results)
    ok = all(f["succeeded"] == f["jobs"] for f in results["throughput"].values()) and (not take or take["failed"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
