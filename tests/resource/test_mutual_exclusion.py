"""Mutual exclusion under fire: 64 concurrent holders in worker processes (random kinds, TTLs and
behaviours, some never releasing), workers killed with SIGKILL, the broker killed with SIGKILL and
stopped with SIGTERM and restarted — then the recorded history is checked:

- the broker's history (its event log, as WatchLeases delivered it across the restarts and as
  the SQLite file holds it — both must be the same gap-free sequence): never two live leases on
  one slot, every end matches the slot's holder, fencing tokens strictly increase per slot;
- the holders' own record (what each was told, with the wall time it learnt it): on every slot
  the intervals during which a holder believed it held the slot (from the grant's arrival until
  it stopped, or at the latest the last expiry the broker confirmed) never overlap, tokens
  increase in that order, and every grant a holder saw is in the broker's history.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from mocap.v1 import resource_pb2
from resource_svc.leases import EventType, LeaseEvent
from resource_svc.store import SqliteLeaseStore
from tests.support import REPO

from .conftest import eventually, stub

KINDS = {resource_pb2.SLOT_KIND_TRAINING: "training", resource_pb2.SLOT_KIND_INFERENCE: "inference"}


@dataclass
class Scenario:
    seconds: float
    workers: int  # processes, CLIENTS holders each, 64 in all
    worker_kills: tuple[float, ...]  # offsets at which one worker is SIGKILLed (and replaced)
    broker_restarts: tuple[tuple[float, str], ...]  # (offset, "kill" | "term")

    @property
    def clients(self) -> int:
        return 64 // self.workers


QUICK = Scenario(seconds=22, workers=4, worker_kills=(5, 11, 17), broker_restarts=((8, "kill"), (14, "term")))
LONG = Scenario(seconds=90, workers=8, worker_kills=tuple(range(4, 86, 6)),
                broker_restarts=tuple((t, "kill" if i % 2 == 0 else "term") for i, t in enumerate(range(9, 86, 10))))


@dataclass
class Belief:
    """What one holder was told about one lease."""

    name: str
    token: int
    slot: tuple[str, str, int]
    start: float  # wall time the grant arrived
    expire: float  # the last expiry the broker confirmed
    stop: float = math.inf  # wall time the holder stopped using it

    @property
    def end(self) -> float:
        return min(self.stop, self.expire)


async def test_no_two_holders_ever_share_a_slot(start_broker, tmp_path):
    await _run(QUICK, start_broker, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_no_two_holders_ever_share_a_slot_long(start_broker, tmp_path):
    await _run(LONG, start_broker, tmp_path)


async def _run(scenario: Scenario, start_broker, tmp_path: Path) -> None:
    broker = start_broker("--cpu-devices", "2")  # 2 x (1 training + 2 inference) = 6 slots for 64 holders
    logs = tmp_path / "holders"
    logs.mkdir()
    started = time.time()
    stop_at = started + scenario.seconds
    workers: list[subprocess.Popen] = []

    def spawn() -> None:
        seed = len(workers)
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "tests.resource.holder_worker", broker.address, str(logs / f"w{seed}.log"),
             str(seed), str(scenario.clients), repr(stop_at)], cwd=REPO, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=open(logs / f"w{seed}.err", "wb")))

    killed: list[subprocess.Popen] = []
    streamed: list[resource_pb2.LeaseEvent] = []
    watcher = asyncio.create_task(_watch_everything(broker.address, streamed))
    try:
        for _ in range(scenario.workers):
            spawn()
        actions = sorted([(t, "worker", "") for t in scenario.worker_kills]
                         + [(t, "broker", how) for t, how in scenario.broker_restarts])
        for offset, what, how in actions:
            await asyncio.sleep(max(0.0, started + offset - time.time()))
            if what == "worker":
                victim = next((w for w in workers[::-1] if w.poll() is None), None)
                assert victim is not None, f"every worker died; see {logs}/*.err"
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim)
                spawn()
            else:
                broker.kill() if how == "kill" else broker.stop()
                broker = await asyncio.to_thread(start_broker, "--cpu-devices", "2", port=broker.port)
        for worker in workers:
            code = await asyncio.to_thread(worker.wait, max(1.0, stop_at - time.time() + 15))
            assert worker in killed or code == 0, f"a holder worker failed: {_tail(logs, workers.index(worker))}"
        # Holders that never released and killed workers' leases run out within their TTL (<= 3 s).
        async with grpc.aio.insecure_channel(broker.address) as channel:
            await eventually(lambda: _no_active_leases(channel), 15, "every lease to end")
        store = SqliteLeaseStore(tmp_path / "leases.sqlite3", synchronous="normal")
        try:
            stored = await asyncio.to_thread(store.read_events, 0, 10_000_000)
        finally:
            store.close()
        await eventually(lambda: streamed and streamed[-1].seq >= stored[-1].seq, 10, "the watch to catch up")
    finally:
        watcher.cancel()
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    _check_stream_matches_store(streamed, stored)
    _check_broker_history(stored)
    beliefs = _read_beliefs(logs)
    _check_beliefs(beliefs, stored)
    reclaims = sum(1 for e in stored if e.type is EventType.RECLAIMED)
    grants = sum(1 for e in stored if e.type is EventType.GRANTED)
    assert reclaims > 0 and grants >= 50 and len(beliefs) >= 50, (grants, reclaims, len(beliefs))
    assert len(workers) == scenario.workers + len(scenario.worker_kills)


def _tail(logs: Path, index: int) -> str:
    return (logs / f"w{index}.err").read_text(errors="replace")[-3000:]


async def _no_active_leases(channel) -> bool:
    try:
        response = await stub(channel).ListLeases(resource_pb2.ListLeasesRequest(
            state=resource_pb2.LEASE_STATE_ACTIVE), timeout=5)
    except grpc.RpcError:
        return False
    return not response.leases


async def _watch_everything(address: str, events: list[resource_pb2.LeaseEvent]) -> None:
    """Follows WatchLeases from the start, resuming after the last seq whenever the broker restarts."""
    while True:
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                after = events[-1].seq if events else 0
                async for event in stub(channel).WatchLeases(resource_pb2.WatchLeasesRequest(after_seq=after)):
                    events.append(event)
        except grpc.RpcError:
            pass
        await asyncio.sleep(0.1)


def _key(device: str, kind: str, slot: int) -> tuple[str, str, int]:
    return (device, kind, slot)


def _check_stream_matches_store(streamed: list[resource_pb2.LeaseEvent], stored: list[LeaseEvent]) -> None:
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1)), "the stored history has gaps"
    kinds = {EventType.GRANTED: resource_pb2.LEASE_EVENT_TYPE_GRANTED,
             EventType.RENEWED: resource_pb2.LEASE_EVENT_TYPE_RENEWED,
             EventType.RELEASED: resource_pb2.LEASE_EVENT_TYPE_RELEASED,
             EventType.RECLAIMED: resource_pb2.LEASE_EVENT_TYPE_RECLAIMED}
    assert [(e.seq, e.type, e.lease.name, e.lease.fencing_token) for e in streamed] == [
        (e.seq, kinds[e.type], e.lease.name, e.lease.fencing_token) for e in stored]


def _check_broker_history(stored: list[LeaseEvent]) -> None:
    holder: dict[tuple[str, str, int], str] = {}
    last_token: dict[tuple[str, str, int], int] = defaultdict(int)
    for event in stored:
        lease = event.lease
        key = _key(lease.device, lease.kind.value, lease.slot)
        if event.type is EventType.GRANTED:
            assert key not in holder, f"seq {event.seq}: {lease.name} granted {key} held by {holder.get(key)}"
            assert lease.fencing_token > last_token[key], f"seq {event.seq}: token did not increase on {key}"
            last_token[key] = lease.fencing_token
            holder[key] = lease.name
        else:
            assert holder.get(key) == lease.name, f"seq {event.seq}: {event.type} of a lease not holding {key}"
            if event.type in (EventType.RELEASED, EventType.RECLAIMED):
                del holder[key]
    assert not holder, f"leases never ended: {holder}"


def _read_beliefs(logs: Path) -> dict[str, Belief]:
    beliefs: dict[str, Belief] = {}
    for path in sorted(logs.glob("w*.log")):
        for line in path.read_text().splitlines():
            parts = line.split()
            try:  # the last line of a SIGKILLed worker may be cut short
                if parts[0] == "G" and len(parts) == 8:
                    name, token, device, kind, slot, t_ack, expire = parts[1:]
                    beliefs[name] = Belief(name, int(token), _key(device, KINDS[int(kind)], int(slot)),
                                           float(t_ack), float(expire))
                elif parts[0] == "R" and len(parts) == 3 and parts[1] in beliefs:
                    belief = beliefs[parts[1]]
                    belief.expire = max(belief.expire, float(parts[2]))
                elif parts[0] == "X" and len(parts) == 3 and parts[1] in beliefs:
                    beliefs[parts[1]].stop = float(parts[2])
            except (ValueError, KeyError, IndexError):
                continue
    return beliefs


def _check_beliefs(beliefs: dict[str, Belief], stored: list[LeaseEvent]) -> None:
    granted = {e.lease.name: (e.lease.fencing_token, _key(e.lease.device, e.lease.kind.value, e.lease.slot))
               for e in stored if e.type is EventType.GRANTED}
    by_slot: dict[tuple[str, str, int], list[Belief]] = defaultdict(list)
    for belief in beliefs.values():
        assert granted.get(belief.name) == (belief.token, belief.slot), f"{belief.name} not granted as told"
        by_slot[belief.slot].append(belief)
    for slot, held in by_slot.items():
        held.sort(key=lambda b: b.start)
        latest_end, latest = -math.inf, None
        for belief in held:
            assert belief.start >= latest_end, (
                f"{slot}: {belief.name} (token {belief.token}) believed granted at {belief.start:.6f} while "
                f"{latest.name} (token {latest.token}) believed it held the slot until {latest_end:.6f}")
            assert latest is None or belief.token > latest.token, f"{slot}: tokens out of order"
            latest_end, latest = max(latest_end, belief.end), belief
