"""Telling leaked GPU memory: a process holding memory on a device with no live lease for it.

A process counts as leased when it is the holder of an active lease on that device or a
descendant of one (`lease run` holds the lease; the command it runs is its child and is the one
that allocates GPU memory). Anything else holding memory there is a leak: a crashed worker's
orphan, a job started beside the broker, a holder that released its lease but kept its CUDA
context. Holder pids are only meaningful on the broker's own host and pid namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from resource_svc.leases import GpuProcess

# Parent pids of a process, nearest first; None when the process no longer exists.
AncestorLookup = Callable[[int], "list[int] | None"]


def process_ancestors(pid: int) -> list[int] | None:
    """Parent pids of `pid` from the OS (psutil), nearest first; None if it is gone."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).parents()]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return []


def find_unleased(processes: Iterable[GpuProcess], holder_pids: set[int],
                  ancestors: AncestorLookup = process_ancestors) -> list[GpuProcess]:
    """The processes that are neither a lease holder nor a descendant of one (gone ones skipped)."""
    unleased = []
    for process in processes:
        if process.pid in holder_pids:
            continue
        parents = ancestors(process.pid)
        if parents is None:  # exited since NVML listed it: it holds nothing any more
            continue
        if holder_pids.intersection(parents):
            continue
        unleased.append(GpuProcess(pid=process.pid, used_memory_bytes=process.used_memory_bytes, unleased=True))
    return unleased


def mark_unleased(processes: Iterable[GpuProcess], holder_pids: set[int],
                  ancestors: AncestorLookup = process_ancestors) -> list[GpuProcess]:
    """All `processes`, with `unleased` set on those `find_unleased` reports (for ListDevices)."""
    processes = list(processes)
    leaked = {p.pid for p in find_unleased(processes, holder_pids, ancestors)}
    return [GpuProcess(p.pid, p.used_memory_bytes, p.pid in leaked) for p in processes]
