"""The broker's domain model with a manual clock: fair waiting, owner checks, idempotency,
restarts, pruning and GPU leak detection. Real SQLite in tmp_path; no gRPC."""

from __future__ import annotations

import asyncio

import pytest

from resource_svc.broker import SlotPlan
from resource_svc.leases import (
    BrokerClosed,
    EventType,
    GpuProcess,
    Lease,
    LeaseEvent,
    LeaseLost,
    LeaseNotFound,
    LeaseState,
    NoSlot,
    NoSuchDevice,
    RequestReused,
    SlotKind,
    Superseded,
)
from resource_svc.store import SqliteLeaseStore

from .helpers import FixedInventory, ManualClock, cpu_plan, gpu, open_broker, request, settle

TRAINING = SlotKind.TRAINING


async def _events(broker, after_seq: int = 0) -> list[LeaseEvent]:
    """The committed events after `after_seq` (what WatchLeases replays)."""
    found = []
    watch = broker.watch(after_seq)
    stream = aiter(watch)
    while True:
        try:
            event = await asyncio.wait_for(anext(stream), 0.5)
        except TimeoutError:
            break
        found.append(event)
    await watch.close()
    return found


async def test_grants_spread_over_devices_and_tokens_increase_per_slot(tmp_path):
    broker = await open_broker(tmp_path / "l.db", ManualClock(), cpu_devices=2)
    first = await broker.acquire(request())
    second = await broker.acquire(request())
    assert {first.device, second.device} == {"cpu:0", "cpu:1"}  # the least used device first
    assert (first.slot, first.fencing_token, first.device_index) == (0, 1, -1)
    await broker.release(first.name, first.fencing_token)
    again = await broker.acquire(request(device=first.device))
    assert (again.device, again.slot, again.fencing_token) == (first.device, 0, 2)
    await broker.close()


async def test_waiters_are_served_by_priority_then_arrival(tmp_path):
    broker = await open_broker(tmp_path / "l.db", ManualClock())
    current = await broker.acquire(request(TRAINING))
    priorities = [0, 5, 0, 5, -1]
    waiters = []
    for i, priority in enumerate(priorities):
        waiters.append(asyncio.create_task(broker.acquire(request(TRAINING, priority=priority, pid=2000 + i))))
        await settle()
    assert broker.waiting(TRAINING) == 5
    served = []
    for _ in priorities:
        await broker.release(current.name, current.fencing_token)
        await settle()
        done = [i for i, task in enumerate(waiters) if task.done() and i not in served]
        assert len(done) == 1, "exactly one waiter is granted per freed slot"
        served.append(done[0])
        current = waiters[done[0]].result()
        assert current.holder.pid == 2000 + done[0]
    assert served == [1, 3, 0, 2, 4]
    assert broker.waiting() == 0
    await broker.close()


async def test_cancelled_waiter_leaves_the_queue_at_once_and_loses_its_turn(tmp_path):
    broker = await open_broker(tmp_path / "l.db", ManualClock())
    holder = await broker.acquire(request(TRAINING))
    first = asyncio.create_task(broker.acquire(request(TRAINING, pid=1)))
    await settle()
    second = asyncio.create_task(broker.acquire(request(TRAINING, pid=2)))
    await settle()
    assert broker.waiting(TRAINING) == 2
    first.cancel()
    await asyncio.sleep(0)  # one loop turn
    assert broker.waiting(TRAINING) == 1
    [device] = broker.devices()
    assert {s.kind: s.waiting for s in device.slots}[TRAINING] == 1
    await broker.release(holder.name, holder.fencing_token)
    granted = await second
    assert granted.holder.pid == 2 and granted.fencing_token == 2
    assert first.cancelled()
    await broker.close()


async def test_grant_racing_a_cancelled_caller_returns_the_slot(tmp_path):
    """The slot is granted to a waiter whose caller is cancelled before it sees the grant: the
    lease is released at once and the next waiter gets the slot."""
    broker = await open_broker(tmp_path / "l.db", ManualClock())
    holder = await broker.acquire(request(TRAINING))
    doomed = asyncio.create_task(broker.acquire(request(TRAINING, pid=1)))
    await settle()
    patient = asyncio.create_task(broker.acquire(request(TRAINING, pid=2)))
    await settle()
    releasing = asyncio.create_task(broker.release(holder.name, holder.fencing_token))
    await asyncio.sleep(0)  # the release's first step runs: the slot is granted to `doomed`
    [granted] = broker.list(state=LeaseState.ACTIVE)
    assert granted.holder.pid == 1 and not doomed.done()
    doomed.cancel()  # ...before its task has resumed with the grant
    await releasing
    replacement = await patient
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert (replacement.slot, replacement.fencing_token) == (granted.slot, granted.fencing_token + 1)
    assert broker.get(granted.name).state is LeaseState.RELEASED
    events = [(e.type, e.lease.holder.pid) for e in await _events(broker)]
    assert events[-3:] == [(EventType.GRANTED, 1), (EventType.RELEASED, 1), (EventType.GRANTED, 2)]
    await broker.close()


async def test_immediate_grant_whose_caller_leaves_before_the_commit_goes_back(tmp_path):
    broker = await open_broker(tmp_path / "l.db", ManualClock())
    caller = asyncio.create_task(broker.acquire(request(TRAINING)))
    await asyncio.sleep(0)  # granted in memory, waiting for its commit
    [granted] = broker.list(state=LeaseState.ACTIVE)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert broker.get(granted.name).state is LeaseState.RELEASED
    assert (await broker.acquire(request(TRAINING))).fencing_token == granted.fencing_token + 1
    await broker.close()


async def test_waiter_whose_wait_runs_out_gets_no_slot_and_leaves_the_queue(tmp_path):
    clock = ManualClock()
    broker = await open_broker(tmp_path / "l.db", clock)
    await broker.acquire(request(TRAINING, ttl_s=60))
    waiter = asyncio.create_task(broker.acquire(request(TRAINING, max_wait_s=5)))
    await settle()
    clock.advance(4.9)
    broker.run_due()
    await settle()
    assert not waiter.done() and broker.waiting() == 1
    clock.advance(0.2)
    broker.run_due()
    with pytest.raises(NoSlot):
        await waiter
    assert broker.waiting() == 0
    with pytest.raises(NoSlot):  # max_wait 0: do not wait at all
        await broker.acquire(request(TRAINING, max_wait_s=0))
    await broker.close()


async def test_request_id_returns_the_same_live_lease_and_refuses_reuse(tmp_path):
    broker = await open_broker(tmp_path / "l.db", ManualClock())
    lease = await broker.acquire(request(request_id="job-7"))
    again = await broker.acquire(request(request_id="job-7"))
    assert (again.name, again.fencing_token) == (lease.name, lease.fencing_token)
    with pytest.raises(RequestReused):
        await broker.acquire(request(request_id="job-7", priority=3))
    await broker.release(lease.name, lease.fencing_token)
    with pytest.raises(LeaseLost):  # that grant is over: a new key is needed
        await broker.acquire(request(request_id="job-7"))
    await broker.close()


async def test_retry_of_a_waiting_acquire_takes_its_place(tmp_path):
    broker = await open_broker(tmp_path / "l.db", ManualClock())
    holder = await broker.acquire(request(TRAINING))
    original = asyncio.create_task(broker.acquire(request(TRAINING, request_id="r1", pid=5)))
    await settle()
    later = asyncio.create_task(broker.acquire(request(TRAINING, pid=6)))
    await settle()
    retry = asyncio.create_task(broker.acquire(request(TRAINING, request_id="r1", pid=5)))
    await settle()
    with pytest.raises(Superseded):
        await original
    assert broker.waiting() == 2
    await broker.release(holder.name, holder.fencing_token)
    granted = await retry  # kept the original's turn, ahead of `later`
    assert granted.request_id == "r1" and not later.done()
    later.cancel()
    await broker.close()


async def test_owner_checks_on_release_renew_and_validate(tmp_path):
    clock = ManualClock()
    broker = await open_broker(tmp_path / "l.db", clock)
    lease = await broker.acquire(request(ttl_s=10))
    with pytest.raises(LeaseLost):
        await broker.release(lease.name, lease.fencing_token + 1)
    with pytest.raises(LeaseLost):
        await broker.renew(lease.name, 0)
    assert broker.validate(lease.name, lease.fencing_token)[0]
    assert not broker.validate(lease.name, lease.fencing_token + 1)[0]
    renewed = await broker.renew(lease.name, lease.fencing_token)
    assert renewed.expire_time == clock.now() + 10
    released, did = await broker.release(lease.name, lease.fencing_token)
    assert did and released.state is LeaseState.RELEASED
    again, did = await broker.release(lease.name, lease.fencing_token)  # idempotent for the holder
    assert not did and again.state is LeaseState.RELEASED
    assert not broker.validate(lease.name, lease.fencing_token)[0]
    with pytest.raises(LeaseLost):
        await broker.release("leases/0000", 1)
    with pytest.raises(LeaseNotFound):
        broker.get("leases/0000")
    await broker.close()


async def test_a_lease_past_its_deadline_is_lost_even_before_the_expiry_task_runs(tmp_path):
    clock = ManualClock()
    broker = await open_broker(tmp_path / "l.db", clock)
    lease = await broker.acquire(request(ttl_s=10))
    clock.advance(10)
    assert not broker.validate(lease.name, lease.fencing_token)[0]
    with pytest.raises(LeaseLost):
        await broker.renew(lease.name, lease.fencing_token)
    assert broker.get(lease.name).state is LeaseState.RECLAIMED
    with pytest.raises(LeaseLost):
        await broker.release(lease.name, lease.fencing_token)
    await broker.close()


async def test_expired_lease_is_reclaimed_and_the_waiter_gets_the_slot(tmp_path):
    clock = ManualClock()
    broker = await open_broker(tmp_path / "l.db", clock)
    lease = await broker.acquire(request(TRAINING, ttl_s=3, pid=41))
    waiter = asyncio.create_task(broker.acquire(request(TRAINING, pid=42)))
    await settle()
    clock.advance(2.5)
    assert broker.run_due() == 0
    clock.advance(0.5)
    assert broker.run_due() == 1
    granted = await waiter
    assert granted.holder.pid == 42 and granted.fencing_token == lease.fencing_token + 1
    reclaim = [e for e in await _events(broker) if e.type is EventType.RECLAIMED]
    assert reclaim[0].lease.holder.pid == 41  # who lost it
    await broker.close()


async def test_restart_keeps_live_leases_reclaims_expired_ones_and_tokens_continue(tmp_path):
    clock = ManualClock()
    db = tmp_path / "l.db"
    broker = await open_broker(db, clock)
    short = await broker.acquire(request(ttl_s=10))
    long = await broker.acquire(request(ttl_s=100))
    last_seq = broker.last_seq
    await broker.close()

    clock.advance(50)
    broker = await open_broker(db, clock)
    assert broker.get(short.name).state is LeaseState.RECLAIMED
    assert broker.get(long.name).state is LeaseState.ACTIVE
    assert broker.validate(long.name, long.fencing_token)[0]
    fresh = await broker.acquire(request())
    assert (fresh.slot, fresh.fencing_token) == (short.slot, short.fencing_token + 1)
    with pytest.raises(NoSlot):  # both slots held: no double grant of the restored one
        await broker.acquire(request(max_wait_s=0))
    events = await _events(broker, after_seq=last_seq)
    assert [e.seq for e in events] == list(range(last_seq + 1, last_seq + 1 + len(events)))
    assert [e.type for e in events] == [EventType.RECLAIMED, EventType.GRANTED]
    await broker.close()


async def test_restore_resolves_two_active_rows_on_one_slot_by_the_newer_token(tmp_path):
    """A release whose commit failed leaves an old ACTIVE row beside the newer grant's."""
    clock = ManualClock()
    db = tmp_path / "l.db"

    def row(name: str, token: int, seq: int) -> LeaseEvent:
        lease = Lease(name=name, device="cpu:0", device_key="cpu:0", device_uuid="", device_index=-1,
                      kind=TRAINING, slot=0, fencing_token=token, state=LeaseState.ACTIVE, holder=request().holder,
                      ttl_s=60, priority=0, grant_time=clock.now(), expire_time=clock.now() + 60,
                      renew_time=clock.now(), grant_seq=seq)
        return LeaseEvent(seq=seq, time=clock.now(), type=EventType.GRANTED, device="cpu:0", lease=lease)

    store = SqliteLeaseStore(db, synchronous="normal")
    store.append([row("leases/old", 1, 1), row("leases/new", 2, 2)])
    store.close()
    broker = await open_broker(db, clock)
    assert broker.get("leases/new").state is LeaseState.ACTIVE
    assert broker.get("leases/old").state is LeaseState.RECLAIMED
    with pytest.raises(NoSlot):
        await broker.acquire(request(TRAINING, max_wait_s=0))
    await broker.close()


async def test_history_is_bounded_and_watch_says_where_it_starts(tmp_path):
    broker = await open_broker(tmp_path / "l.db", ManualClock(), ended_kept=5, events_kept=20, prune_every=1)
    names = []
    for _ in range(30):
        lease = await broker.acquire(request())
        names.append(lease.name)
        await broker.release(lease.name, lease.fencing_token)
    with pytest.raises(LeaseNotFound):
        broker.get(names[0])
    assert broker.get(names[-1]).state is LeaseState.RELEASED
    assert len(broker.list()) == 5
    events = await _events(broker)
    assert 20 <= len(events) <= 21 and events[-1].seq == 60
    assert events[0].seq > 1  # the client can see it missed the pruned ones
    await broker.close()


async def test_slow_watcher_never_blocks_the_broker_and_misses_nothing(tmp_path):
    broker = await open_broker(tmp_path / "l.db", ManualClock(), watch_buffer=8)
    watch = broker.watch(0)
    events = aiter(watch)
    await broker.acquire(request(TRAINING))
    first = await asyncio.wait_for(anext(events), 5)  # following live now, then stops reading for a while
    for _ in range(50):  # 100 events while the watcher's buffer holds 8
        lease = await broker.acquire(request())
        await broker.release(lease.name, lease.fencing_token)
    seen = [first.seq]
    while seen[-1] < broker.last_seq:
        seen.append((await asyncio.wait_for(anext(events), 5)).seq)
    assert seen == list(range(1, broker.last_seq + 1))
    await watch.close()
    live = broker.watch(0, live_only=True)
    lease = await broker.acquire(request())
    assert (await asyncio.wait_for(anext(aiter(live)), 5)).lease.name == lease.name  # no history replayed
    await live.close()
    await broker.close()


async def test_memory_selector_and_any_prefers_the_emptiest_gpu(tmp_path):
    inventory = FixedInventory([gpu(0), gpu(1)], used={"gpu:0": 70 * 2**30, "gpu:1": 10 * 2**30})
    broker = await open_broker(tmp_path / "l.db", ManualClock(), inventory=inventory, plan=SlotPlan())
    lease = await broker.acquire(request())
    assert (lease.device, lease.device_index, lease.device_uuid) == ("gpu:1", 1, "GPU-test-1")
    assert (await broker.acquire(request(min_free=20 * 2**30))).device == "gpu:1"
    assert (await broker.acquire(request(device="GPU-test-0"))).device == "gpu:0"
    with pytest.raises(NoSuchDevice):
        await broker.acquire(request(min_free=100 * 2**30))
    with pytest.raises(NoSuchDevice):
        await broker.acquire(request(device=7))
    await broker.close()


async def test_leaked_gpu_memory_is_reported_once_with_its_pid(tmp_path):
    inventory = FixedInventory([gpu(0)])
    parents = {101: [100, 1], 200: [1], 300: [1]}
    broker = await open_broker(tmp_path / "l.db", ManualClock(), inventory=inventory, plan=SlotPlan(),
                               ancestors=lambda pid: parents.get(pid))
    lease = await broker.acquire(request(pid=100))
    other = await broker.acquire(request(pid=300))
    # The holder (100), its child (101) and a process nobody leased (200) hold memory; 999 exited.
    inventory.processes_by_device["gpu:0"] = [GpuProcess(100, 2**30), GpuProcess(101, 2**30),
                                              GpuProcess(200, 3 * 2**30), GpuProcess(999, 2**30)]
    await broker.release(other.name, other.fencing_token)
    leaks = await broker.check_leaks("gpu:0")
    assert [(p.pid, p.used_memory_bytes, p.unleased) for p in leaks] == [(200, 3 * 2**30, True)]
    await broker.check_leaks("gpu:0")  # still there: not reported twice
    inventory.processes_by_device["gpu:0"].append(GpuProcess(300, 2**30))  # kept memory after its release
    await broker.check_leaks("gpu:0")
    reported = [(e.device, e.process.pid) for e in await _events(broker) if e.type is EventType.LEAK_DETECTED]
    assert reported == [("gpu:0", 200), ("gpu:0", 300)]
    [device] = broker.devices()
    assert {p.pid: p.unleased for p in device.figures.processes} == {100: False, 101: False, 200: True, 999: False,
                                                             300: True}
    await broker.release(lease.name, lease.fencing_token)
    await broker.close()


async def test_shutdown_fails_waiters_so_they_retry_elsewhere(tmp_path):
    broker = await open_broker(tmp_path / "l.db", ManualClock(), plan=cpu_plan(training=1))
    await broker.acquire(request(TRAINING))
    waiter = asyncio.create_task(broker.acquire(request(TRAINING)))
    await settle()
    broker.stop_accepting()
    with pytest.raises(BrokerClosed):
        await waiter
    with pytest.raises(BrokerClosed):
        await broker.acquire(request())
    await broker.close()
