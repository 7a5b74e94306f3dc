"""When to look for leaked GPU memory, and reporting each leak once.

After a lease on a GPU is released or reclaimed, the device is checked a little later (its holder
may still be tearing down its CUDA context): NVML lists who holds memory there, `leaks` tells
which of those hold no live lease, and each newly seen one is reported — a log line and a
LEAK_DETECTED event (which the metrics count). A process stays "reported" while it keeps leaking,
so one leak is one report however many releases follow. What counts as a leak is `leaks`'s job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from mocap_common.logs import get_logger
from resource_svc.expiry import Clock
from resource_svc.leaks import AncestorLookup, find_unleased, mark_unleased
from resource_svc.leases import DeviceFigures, DeviceKind, DeviceSpec, GpuProcess

log = get_logger(__name__)

ProcessLister = Callable[[str], list[GpuProcess]]  # device id -> processes holding memory (blocking)
ReportLeak = Callable[[str, GpuProcess, float], None]  # (device id, process, time) -> recorded
Spawn = Callable[[Coroutine[Any, Any, Any], str], None]  # runs work in a task the broker owns


class LeakChecks:
    """Delayed, deduplicated leak checks on the GPUs among `specs`."""

    def __init__(self, specs: Iterable[DeviceSpec], *, delay_s: float, clock: Clock,
                 list_processes: ProcessLister, ancestors: AncestorLookup,
                 holder_pids: Callable[[str], set[int]], report: ReportLeak, spawn: Spawn) -> None:
        self._gpus = {spec.key: spec for spec in specs if spec.kind is DeviceKind.GPU}
        self._delay_s = delay_s
        self._clock = clock
        self._list_processes = list_processes
        self._ancestors = ancestors
        self._holder_pids = holder_pids  # device key -> pids of its live leases' holders
        self._report = report
        self._spawn = spawn
        self._pending: dict[str, asyncio.TimerHandle] = {}  # by device key
        self._reported: dict[str, set[int]] = {}  # by device key: pids reported and still leaking
        self._stopped = False

    def after_release(self, device_key: str) -> None:
        """A lease on the device ended: check it after the delay (nothing for CPU devices)."""
        spec = self._gpus.get(device_key)
        if spec is None or device_key in self._pending or self._stopped:
            return  # one pending check per device covers every release before it runs
        self._pending[device_key] = asyncio.get_running_loop().call_later(self._delay_s, self._start, spec)

    def stop(self) -> None:
        """No new checks from now on; pending ones still run (see `cancel_pending`)."""
        self._stopped = True

    def cancel_pending(self) -> None:
        for handle in self._pending.values():
            handle.cancel()

    async def check(self, device_id: str) -> list[GpuProcess]:
        """Asks who holds memory on the device; reports each newly seen process with no live lease.
        Returns the leaks found now, reported before or not ([] for CPU devices and failed queries)."""
        spec = next((s for s in self._gpus.values() if s.id == device_id), None)
        if spec is None:
            return []
        try:
            processes = await asyncio.to_thread(self._list_processes, device_id)
        except Exception as exc:  # noqa: BLE001 - a failed NVML query must not hurt the broker
            log.warning("leak check failed", device=device_id, error=str(exc))
            return []
        leaks = find_unleased(processes, self._holder_pids(spec.key), self._ancestors)
        self._report_new(spec, leaks)
        return leaks

    def marked(self, spec: DeviceSpec, figures: DeviceFigures) -> DeviceFigures:
        """`figures` with each listed process marked leased or not (for ListDevices)."""
        if not figures.processes:
            return figures
        processes = mark_unleased(figures.processes, self._holder_pids(spec.key), self._ancestors)
        return DeviceFigures(figures.memory_used_bytes, figures.utilization_percent, tuple(processes),
                             figures.refresh_time)

    def _start(self, spec: DeviceSpec) -> None:
        del self._pending[spec.key]
        self._spawn(self.check(spec.id), f"leak-check-{spec.id}")

    def _report_new(self, spec: DeviceSpec, leaks: list[GpuProcess]) -> None:
        reported = self._reported.setdefault(spec.key, set())
        reported.intersection_update(p.pid for p in leaks)  # forget processes that went away or got leased
        now = self._clock.now()
        for process in leaks:
            if process.pid in reported:
                continue
            reported.add(process.pid)
            log.warning("gpu memory held without a lease", device=spec.id, pid=process.pid,
                        used_memory_bytes=process.used_memory_bytes)
            self._report(spec.id, process, now)
