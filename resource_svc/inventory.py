"""The devices the broker leases: NVIDIA GPUs through NVML (pynvml), or configured CPU devices.

With no NVIDIA driver (laptops, CI) the broker serves CPU devices `cpu:0..cpu:N-1`, so the mesh
runs anywhere; their figures are all zero and they have no processes to inspect.

NVML calls block (and can take milliseconds), so the broker calls `refresh()` and `processes()`
from a worker thread, never on its event loop.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from mocap_common.logs import get_logger
from resource_svc.leases import DeviceFigures, DeviceKind, DeviceSpec, GpuProcess

log = get_logger(__name__)


class InventoryError(RuntimeError):
    """NVML was asked for but cannot be used."""


class Inventory(Protocol):
    """The broker's view of its devices."""

    def specs(self) -> list[DeviceSpec]:
        """Every device, in index order; fixed for the broker's lifetime."""
        ...

    def figures(self, device_id: str) -> DeviceFigures:
        """The latest figures read by `refresh()`."""
        ...

    def refresh(self) -> None:
        """Reads memory, utilisation and processes of every device (blocking)."""
        ...

    def processes(self, device_id: str) -> list[GpuProcess]:
        """Processes holding memory on the device right now (blocking; [] for CPU devices)."""
        ...

    def close(self) -> None:
        ...


class CpuInventory:
    """`count` CPU devices, `cpu:0` ... — what the broker serves without an NVIDIA driver."""

    def __init__(self, count: int = 1) -> None:
        if count < 1:
            raise ValueError("at least one CPU device is needed without GPUs")
        self._specs = [DeviceSpec(id=f"cpu:{i}", kind=DeviceKind.CPU, index=i, name="cpu") for i in range(count)]
        self._figures = DeviceFigures(refresh_time=time.time())

    def specs(self) -> list[DeviceSpec]:
        return list(self._specs)

    def figures(self, device_id: str) -> DeviceFigures:
        return self._figures

    def refresh(self) -> None:
        self._figures = DeviceFigures(refresh_time=time.time())

    def processes(self, device_id: str) -> list[GpuProcess]:
        return []

    def close(self) -> None:
        pass


class NvmlInventory:
    """NVIDIA GPUs as NVML reports them (nvidia-ml-py)."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # the `resource` extra is not installed
            raise InventoryError(f"nvidia-ml-py is not installed: {exc}") from exc
        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise InventoryError(f"NVML is not available: {exc}") from exc
        self._lock = threading.Lock()  # NVML handles are shared by the refresh and leak-check threads
        self._handles: dict[str, Any] = {}
        self._specs: list[DeviceSpec] = []
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                spec = DeviceSpec(id=f"gpu:{index}", kind=DeviceKind.GPU, index=index,
                                  uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                                  name=_text(pynvml.nvmlDeviceGetName(handle)), memory_total_bytes=int(memory.total))
                self._specs.append(spec)
                self._handles[spec.id] = handle
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise InventoryError(f"NVML could not list devices: {exc}") from exc
        self._figures: dict[str, DeviceFigures] = {s.id: DeviceFigures() for s in self._specs}
        self.refresh()

    def specs(self) -> list[DeviceSpec]:
        return list(self._specs)

    def figures(self, device_id: str) -> DeviceFigures:
        return self._figures.get(device_id, DeviceFigures())

    def refresh(self) -> None:
        nvml = self._nvml
        for spec in self._specs:
            handle = self._handles[spec.id]
            try:
                with self._lock:
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                    try:
                        utilization = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                    except nvml.NVMLError:  # not supported on some boards (e.g. MIG)
                        utilization = 0
                processes = tuple(self.processes(spec.id))
            except nvml.NVMLError as exc:  # a GPU fell off the bus: keep the last figures, say so
                log.warning("nvml refresh failed", device=spec.id, error=str(exc))
                continue
            self._figures[spec.id] = DeviceFigures(memory_used_bytes=int(memory.used),
                                                   utilization_percent=utilization, processes=processes,
                                                   refresh_time=time.time())

    def processes(self, device_id: str) -> list[GpuProcess]:
        nvml = self._nvml
        handle = self._handles.get(device_id)
        if handle is None:
            return []
        with self._lock:
            found = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return [GpuProcess(pid=int(p.pid), used_memory_bytes=int(p.usedGpuMemory or 0)) for p in found]

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down: nothing left to do about it
            pass


def open_inventory(mode: str, cpu_devices: int) -> Inventory:
    """`mode` auto: NVML GPUs if there are any, else CPU devices; nvml: GPUs or fail; cpu: CPU devices."""
    if mode not in ("auto", "nvml", "cpu"):
        raise ValueError(f"unknown inventory mode {mode!r}; use auto, nvml or cpu")
    if mode == "cpu":
        return CpuInventory(cpu_devices)
    try:
        inventory = NvmlInventory()
    except InventoryError as exc:
        if mode == "nvml":
            raise
        log.info("no NVIDIA GPUs: serving CPU devices", reason=str(exc), cpu_devices=cpu_devices)
        return CpuInventory(cpu_devices)
    if not inventory.specs():
        inventory.close()
        if mode == "nvml":
            raise InventoryError("NVML found no GPUs")
        log.info("NVML found no GPUs: serving CPU devices", cpu_devices=cpu_devices)
        return CpuInventory(cpu_devices)
    return inventory


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
