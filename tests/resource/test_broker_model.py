"""Property test: the broker against a small reference model (hypothesis stateful testing).

The model is the specification written as plainly as possible: slots per (device, kind), a token
counter per slot, a list of waiters served by priority then arrival, deadlines processed in
order. Hypothesis drives both with random acquires (immediate, waiting, bounded), releases (by
the holder or with a stale token), renewals, validations, request_id retries, cancelled waiters,
clock advances with expiry, and restarts on the same SQLite file — and after every step the
broker's active leases, tokens and queue must be exactly the model's.

Deadlines get a distinct fraction per operation (op * 1e-4 s) so no two fall on the same instant:
the order of simultaneous expiries is an implementation detail the model need not copy.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resource_svc.leases import AcquireRequest, BrokerClosed, LeaseLost, LeaseState, NoSlot, SlotKind

from .helpers import ManualClock, cpu_plan, open_broker, request

DEVICES = ("cpu:0", "cpu:1")
SLOTS = {SlotKind.TRAINING: 1, SlotKind.INFERENCE: 2}


@dataclass(eq=False)
class RefLease:
    device: str
    kind: SlotKind
    slot: int
    token: int
    ttl_s: float
    expire: float
    request: AcquireRequest
    state: LeaseState = LeaseState.ACTIVE
    name: str = ""

    @property
    def key(self) -> tuple[str, SlotKind, int]:
        return (self.device, self.kind, self.slot)


@dataclass(eq=False)
class RefWaiter:
    task: asyncio.Task
    request: AcquireRequest
    arrival: int
    deadline: float | None
    outcome: object = None  # a RefLease, NoSlot, BrokerClosed or "cancelled", once decided


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="broker-model-"))
        self.clock = ManualClock()
        self.broker = self.run(self._open())
        self.tokens: dict[tuple[str, SlotKind, int], int] = {}
        self.leases: list[RefLease] = []
        self.holders: dict[tuple[str, SlotKind, int], RefLease] = {}
        self.queue: list[RefWaiter] = []
        self.decided: list[RefWaiter] = []
        self.ops = 0

    def _open(self):
        return open_broker(self.dir / "l.db", self.clock, cpu_devices=2, plan=cpu_plan(training=1, inference=2))

    def run(self, awaitable):
        return self.loop.run_until_complete(awaitable)

    def teardown(self) -> None:
        for waiter in self.queue:
            waiter.task.cancel()
        self.run(asyncio.sleep(0))
        self.run(self.broker.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the reference model -----------------------------------------------------------------

    def _free(self, device: str, kind: SlotKind) -> list[int]:
        return [s for s in range(SLOTS[kind]) if (device, kind, s) not in self.holders]

    def _pick(self, req: AcquireRequest) -> tuple[str, int] | None:
        """The device with the most free slots (then the lower index), its lowest free slot."""
        best = None
        for index, device in enumerate(DEVICES):
            if req.selector.uuid not in (None, device):
                continue
            free = self._free(device, req.kind)
            if free and (best is None or (-len(free), index) < best[0]):
                best = ((-len(free), index), device, free[0])
        return None if best is None else (best[1], best[2])

    def _grant(self, req: AcquireRequest, device: str, slot: int) -> RefLease:
        key = (device, req.kind, slot)
        self.tokens[key] = self.tokens.get(key, 0) + 1
        lease = RefLease(device, req.kind, slot, self.tokens[key], req.ttl_s, self.clock.now() + req.ttl_s, req)
        self.holders[key] = lease
        self.leases.append(lease)
        return lease

    def _end(self, lease: RefLease, state: LeaseState) -> None:
        lease.state = state
        del self.holders[lease.key]
        self._offer(lease.device, lease.kind)

    def _offer(self, device: str, kind: SlotKind) -> None:
        while self._free(device, kind):
            waiting = sorted((w for w in self.queue if w.request.kind is kind
                              and w.request.selector.uuid in (None, device)),
                             key=lambda w: (-w.request.priority, w.arrival))
            if not waiting:
                return
            waiter = waiting[0]
            self.queue.remove(waiter)
            waiter.outcome = self._grant(waiter.request, device, self._free(device, kind)[0])
            self.decided.append(waiter)

    def _run_due(self) -> None:
        now = self.clock.now()
        due = [(lease.expire, 0, lease) for lease in self.holders.values() if lease.expire <= now]
        due += [(w.deadline, 1, w) for w in self.queue if w.deadline is not None and w.deadline <= now]
        for _, _, item in sorted(due, key=lambda entry: entry[0]):
            if isinstance(item, RefLease):
                if item.state is LeaseState.ACTIVE:
                    self._end(item, LeaseState.RECLAIMED)
            elif item in self.queue:
                self.queue.remove(item)
                item.outcome = NoSlot
                self.decided.append(item)

    def _next_op(self) -> float:
        """A distinct fraction of a second for the deadlines this operation sets."""
        self.ops += 1
        return self.ops * 1e-4

    # -- checking the broker against the model -----------------------------------------------

    def _collect(self) -> None:
        """Waits for the waiters whose outcome the model decided, and checks each outcome."""
        self._check_active()  # grants are synchronous: a wrong one shows at once
        tasks = [w.task for w in self.decided]
        if tasks:
            self.run(asyncio.wait(tasks, timeout=5))
        for waiter in self.decided:
            assert waiter.task.done(), f"the broker did not decide a waiter the model decided: {waiter.outcome}"
            if isinstance(waiter.outcome, RefLease):
                got = waiter.task.result()
                want = waiter.outcome
                assert (got.device, got.kind, got.slot, got.fencing_token) == (want.device, want.kind, want.slot,
                                                                              want.token)
                want.name = got.name
            elif waiter.outcome == "cancelled":
                assert waiter.task.cancelled()
            else:
                assert isinstance(waiter.task.exception(), waiter.outcome)
        self.decided.clear()
        self.run(asyncio.sleep(0))
        assert not any(w.task.done() for w in self.queue), "a waiter finished that the model keeps waiting"

    def _check_lost(self, awaitable) -> None:
        with pytest.raises(LeaseLost):
            self.run(awaitable)

    @invariant()
    def same_leases_tokens_and_queue(self) -> None:
        self._check_active()
        assert self.broker.waiting() == len(self.queue)

    def _check_active(self) -> None:
        active = {(lease.device, lease.kind, lease.slot): (lease.name, lease.fencing_token, lease.holder.pid)
                  for lease in self.broker.list(state=LeaseState.ACTIVE, limit=1000)}
        # A lease granted to a waiter gets its name from the broker once collected; every request
        # has its own pid, so the holder tells which waiter got the slot.
        assert active == {key: (lease.name or active.get(key, ("?",))[0], lease.token, lease.request.holder.pid)
                          for key, lease in self.holders.items()}

    # -- rules ---------------------------------------------------------------------------------

    # Acquires are most of what a broker sees: three rules (hypothesis picks among rules evenly),
    # one of them always willing to wait, so the queue fills and freed slots meet waiters.
    acquire_args = dict(kind=st.sampled_from(list(SlotKind)), device=st.sampled_from((None, *DEVICES)),
                        priority=st.integers(-2, 2), ttl=st.integers(1, 6), max_wait=st.integers(1, 6),
                        with_request_id=st.booleans())

    @rule(wait=st.sampled_from(("no", "forever", "bounded")), **acquire_args)
    def acquire(self, **args) -> None:
        self._acquire(**args)

    @rule(wait=st.sampled_from(("forever", "bounded")), **acquire_args)
    def acquire_waiting(self, **args) -> None:
        self._acquire(**args)

    @rule(wait=st.sampled_from(("forever", "bounded")), **acquire_args)
    def acquire_waiting_too(self, **args) -> None:
        self._acquire(**args)

    def _acquire(self, kind, device, priority, ttl, wait, max_wait, with_request_id) -> None:
        fraction = self._next_op()
        max_wait_s = {"no": 0.0, "forever": None, "bounded": max_wait + fraction}[wait]
        req = request(kind, device=device, ttl_s=ttl + fraction, priority=priority, max_wait_s=max_wait_s,
                      request_id=f"req-{self.ops}" if with_request_id else "", pid=self.ops)
        choice = self._pick(req)
        if choice is not None:
            lease = self.run(self.broker.acquire(req))
            want = self._grant(req, *choice)
            assert (lease.device, lease.slot, lease.fencing_token) == (want.device, want.slot, want.token)
            want.name = lease.name
        elif wait == "no":
            with pytest.raises(NoSlot):
                self.run(self.broker.acquire(req))
        else:
            task = self.loop.create_task(self.broker.acquire(req))
            deadline = None if max_wait_s is None else self.clock.now() + max_wait_s
            self.queue.append(RefWaiter(task, req, self.ops, deadline))
            self.run(asyncio.sleep(0))  # the task's first step: it joins the broker's queue
        self._collect()

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(0, 1000), stale=st.booleans())
    def release(self, pick, stale) -> None:
        lease = self.leases[pick % len(self.leases)]
        token = lease.token + 1 if stale else lease.token
        if stale or lease.state is LeaseState.RECLAIMED:
            self._check_lost(self.broker.release(lease.name, token))
        elif lease.state is LeaseState.RELEASED:
            snapshot, released = self.run(self.broker.release(lease.name, token))
            assert not released and snapshot.state is LeaseState.RELEASED
        elif lease.expire <= self.clock.now():
            self._check_lost(self.broker.release(lease.name, token))
            self._end(lease, LeaseState.RECLAIMED)
        else:
            snapshot, released = self.run(self.broker.release(lease.name, token))
            assert released and snapshot.state is LeaseState.RELEASED
            self._end(lease, LeaseState.RELEASED)
        self._collect()

    @precondition(lambda self: self.holders)
    @rule(pick=st.integers(0, 1000))
    def release_held(self, pick) -> None:
        """The holder of a live lease gives it back (the common case, so freed slots meet waiters)."""
        held = sorted(self.holders.values(), key=lambda lease: lease.token * 10 + lease.slot)
        lease = held[pick % len(held)]
        if lease.expire <= self.clock.now():
            self._check_lost(self.broker.release(lease.name, lease.token))
            self._end(lease, LeaseState.RECLAIMED)
        else:
            snapshot, released = self.run(self.broker.release(lease.name, lease.token))
            assert released and snapshot.state is LeaseState.RELEASED
            self._end(lease, LeaseState.RELEASED)
        self._collect()

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(0, 1000), stale=st.booleans())
    def renew(self, pick, stale) -> None:
        lease = self.leases[pick % len(self.leases)]
        if stale or lease.state is not LeaseState.ACTIVE:
            self._check_lost(self.broker.renew(lease.name, lease.token + 1 if stale else lease.token))
        elif lease.expire <= self.clock.now():
            self._check_lost(self.broker.renew(lease.name, lease.token))
            self._end(lease, LeaseState.RECLAIMED)
        else:
            renewed = self.run(self.broker.renew(lease.name, lease.token))
            lease.expire = self.clock.now() + lease.ttl_s
            assert renewed.expire_time == lease.expire
        self._collect()

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(0, 1000), stale=st.booleans())
    def validate(self, pick, stale) -> None:
        lease = self.leases[pick % len(self.leases)]
        valid, _ = self.broker.validate(lease.name, lease.token + 1 if stale else lease.token)
        assert valid == (not stale and lease.state is LeaseState.ACTIVE and self.clock.now() < lease.expire)

    @precondition(lambda self: any(lease.request.request_id for lease in self.leases))
    @rule(pick=st.integers(0, 1000))
    def retry_acquire(self, pick) -> None:
        """The same Acquire sent again (same request_id): the live lease, or LeaseLost once it ended."""
        retried = [lease for lease in self.leases if lease.request.request_id]
        lease = retried[pick % len(retried)]
        if lease.state is not LeaseState.ACTIVE:
            self._check_lost(self.broker.acquire(lease.request))
        elif lease.expire <= self.clock.now():
            self._check_lost(self.broker.acquire(lease.request))
            self._end(lease, LeaseState.RECLAIMED)
        else:
            again = self.run(self.broker.acquire(lease.request))
            assert (again.name, again.fencing_token) == (lease.name, lease.token)
        self._collect()

    @precondition(lambda self: self.queue)
    @rule(pick=st.integers(0, 1000))
    def cancel_waiter(self, pick) -> None:
        waiter = self.queue.pop(pick % len(self.queue))
        waiter.task.cancel()
        waiter.outcome = "cancelled"
        self.decided.append(waiter)
        self._collect()

    @rule(seconds=st.integers(0, 4))
    def advance_clock(self, seconds) -> None:
        self.clock.advance(seconds)
        self._run_due()
        self.run(self._broker_run_due())
        self._collect()

    async def _broker_run_due(self) -> None:
        self.broker.run_due()  # what the expiry task does when the clock reaches a deadline

    @rule()
    def restart(self) -> None:
        """Close the broker (waiters are told to retry) and open a new one on the same file."""
        self.run(self.broker.close())
        for waiter in self.queue:
            waiter.outcome = BrokerClosed
            self.decided.append(waiter)
        self.queue.clear()
        self._collect()
        self.broker = self.run(self._open())
        for lease in list(self.holders.values()):
            if lease.expire <= self.clock.now():
                self._end(lease, LeaseState.RECLAIMED)


BrokerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
test_broker_matches_the_reference_model = BrokerMachine.TestCase
