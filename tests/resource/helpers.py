"""Test seams for the broker's domain tests: a clock the test moves, and a fixed device list
(for GPU-shaped devices on a machine without NVIDIA's driver)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from resource_svc.broker import BrokerConfig, LeaseBroker, SlotPlan
from resource_svc.inventory import CpuInventory
from resource_svc.leases import (
    AcquireRequest,
    DeviceFigures,
    DeviceKind,
    DeviceSelector,
    DeviceSpec,
    GpuProcess,
    Holder,
    SlotKind,
)
from resource_svc.store import SqliteLeaseStore

T0 = 1_800_000_000.0


class ManualClock:
    """Wall time that moves only when the test calls `advance`."""

    def __init__(self, start: float = T0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    async def wait(self, wake: asyncio.Event, deadline: float | None) -> None:
        await wake.wait()  # tests drive expiry with run_due()


class FixedInventory:
    """Devices with fixed figures; `processes` is what NVML would list per device."""

    def __init__(self, specs: list[DeviceSpec], used: dict[str, int] | None = None) -> None:
        self._specs = specs
        self.used = used or {}
        self.processes_by_device: dict[str, list[GpuProcess]] = {}

    def specs(self) -> list[DeviceSpec]:
        return list(self._specs)

    def figures(self, device_id: str) -> DeviceFigures:
        return DeviceFigures(memory_used_bytes=self.used.get(device_id, 0), refresh_time=T0,
                             processes=tuple(self.processes_by_device.get(device_id, [])))

    def refresh(self) -> None:
        pass

    def processes(self, device_id: str) -> list[GpuProcess]:
        return list(self.processes_by_device.get(device_id, []))

    def close(self) -> None:
        pass


def gpu(index: int, memory_gib: int = 80) -> DeviceSpec:
    return DeviceSpec(id=f"gpu:{index}", kind=DeviceKind.GPU, index=index, uuid=f"GPU-test-{index}",
                      name="Test GPU", memory_total_bytes=memory_gib * 2**30)


def request(kind: SlotKind = SlotKind.INFERENCE, *, device: str | int | None = None, ttl_s: float = 10.0,
            priority: int = 0, request_id: str = "", max_wait_s: float | None = None, pid: int = 1000,
            service: str = "test", min_free: int = 0) -> AcquireRequest:
    selector = DeviceSelector(min_free_memory_bytes=min_free)
    if isinstance(device, int):
        selector = DeviceSelector(index=device, min_free_memory_bytes=min_free)
    elif isinstance(device, str):
        selector = DeviceSelector(uuid=device, min_free_memory_bytes=min_free)
    return AcquireRequest(kind=kind, selector=selector, holder=Holder(service, "", pid, "host"), ttl_s=ttl_s,
                          priority=priority, request_id=request_id, max_wait_s=max_wait_s)


def cpu_plan(training: int = 1, inference: int = 2) -> SlotPlan:
    return SlotPlan(cpu={SlotKind.TRAINING: training, SlotKind.INFERENCE: inference})


async def open_broker(db: Path, clock: ManualClock, *, inventory: object | None = None, cpu_devices: int = 1,
                      plan: SlotPlan | None = None, ended_kept: int = 10_000, events_kept: int = 100_000,
                      prune_every: int = 1_000, watch_buffer: int = 4096, **kwargs: object) -> LeaseBroker:
    store = SqliteLeaseStore(db, synchronous="normal", events_kept=events_kept, ended_kept=ended_kept,
                             prune_every=prune_every)
    broker = LeaseBroker(store, inventory or CpuInventory(cpu_devices),  # type: ignore[arg-type]
                         BrokerConfig(slots=plan or cpu_plan(), ended_kept=ended_kept, leak_check_delay_s=3600,
                                      watch_buffer_events=watch_buffer),
                         clock=clock, **kwargs)  # type: ignore[arg-type]
    await broker.start(run_expiry=False)
    return broker


async def settle() -> None:
    """Lets callbacks and woken tasks run (a few loop turns; no time passes on the manual clock)."""
    for _ in range(5):
        await asyncio.sleep(0)
