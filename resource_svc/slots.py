"""The slot table: every device's slots of each kind, which are free, who holds each one, and
each slot's last fencing token — and the choice of a device for a request.

Plain synchronous state, owned by the broker's event loop (see `broker`). A slot is named by its
`SlotKey` (device key, kind, slot number); the device key is the NVML UUID (or the CPU device id),
so tokens stay with the physical GPU even if NVML renumbers the devices between restarts.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from resource_svc.leases import (
    AcquireRequest,
    DeviceFigures,
    DeviceKind,
    DeviceSelector,
    DeviceSpec,
    Lease,
    NoSuchDevice,
    SlotKind,
)
from resource_svc.store import SlotKey

Pool = tuple[str, SlotKind]  # (device key, kind): the slots one request competes for on one device


@dataclass(frozen=True)
class SlotPlan:
    """How many slots of each kind a device has: defaults per device kind, overrides per device
    (by id such as "gpu:1", or by UUID)."""

    gpu: dict[SlotKind, int] = field(default_factory=lambda: {SlotKind.TRAINING: 1, SlotKind.INFERENCE: 3})
    cpu: dict[SlotKind, int] = field(default_factory=lambda: {SlotKind.TRAINING: 1, SlotKind.INFERENCE: 2})
    overrides: dict[str, dict[SlotKind, int]] = field(default_factory=dict)

    def counts(self, spec: DeviceSpec) -> dict[SlotKind, int]:
        counts = dict(self.gpu if spec.kind is DeviceKind.GPU else self.cpu)
        for name in (spec.id, spec.uuid):
            if name and name in self.overrides:
                counts.update(self.overrides[name])
        return counts


class SlotTable:
    """Slots per device and kind. `take`/`vacate` move a slot between free and held; `pick`
    chooses where a request goes; tokens only ever grow, per slot."""

    def __init__(self, specs: Iterable[DeviceSpec], plan: SlotPlan,
                 figures: Callable[[str], DeviceFigures]) -> None:
        self._figures = figures  # the inventory's latest figures by device id (free memory)
        self._specs: dict[str, DeviceSpec] = {}  # by device key
        self._capacity: dict[Pool, int] = {}
        self._free: dict[Pool, list[int]] = {}  # heaps of free slot numbers: grants take the lowest
        for spec in specs:
            self._specs[spec.key] = spec
            for kind, count in plan.counts(spec).items():
                self._capacity[(spec.key, kind)] = max(0, count)
                self._free[(spec.key, kind)] = list(range(max(0, count)))
        self._holders: dict[SlotKey, Lease] = {}
        self._tokens: dict[SlotKey, int] = {}
        # Candidates depend only on the fixed device list, so each (kind, selector) is looked up once.
        self._candidates: dict[tuple[SlotKind, DeviceSelector], list[DeviceSpec]] = {}

    # -- devices -------------------------------------------------------------------------------

    def specs(self) -> Iterable[DeviceSpec]:
        return self._specs.values()

    def spec(self, device_key: str) -> DeviceSpec | None:
        return self._specs.get(device_key)

    def pools(self) -> list[Pool]:
        """Every (device, kind) with a slot count, served or not."""
        return list(self._free)

    def occupancy(self, device_key: str, kind: SlotKind) -> tuple[int, int]:
        """(slots, held slots) of one pool."""
        total = self._capacity.get((device_key, kind), 0)
        used = sum(1 for slot in range(total) if (device_key, kind, slot) in self._holders)
        return total, used

    # -- fencing tokens ------------------------------------------------------------------------

    def restore_tokens(self, tokens: dict[SlotKey, int]) -> None:
        self._tokens = dict(tokens)

    def raise_token(self, key: SlotKey, token: int) -> None:
        """Makes sure the slot's next token is above `token` (a restored lease holds it)."""
        self._tokens[key] = max(self._tokens.get(key, 0), token)

    def next_token(self, key: SlotKey) -> int:
        """The slot's token for a new grant: one more than any it handed out before."""
        token = self._tokens.get(key, 0) + 1
        self._tokens[key] = token
        return token

    # -- holding -------------------------------------------------------------------------------

    def lowest_free(self, device_key: str, kind: SlotKind) -> int | None:
        free = self._free.get((device_key, kind))
        return free[0] if free else None

    def take(self, lease: Lease) -> None:
        """Records `lease` as its slot's holder; the slot is no longer free."""
        self._holders[lease.slot_key] = lease
        free = self._free.get((lease.device_key, lease.kind))
        if free and free[0] == lease.slot:
            heapq.heappop(free)  # the usual case: grants take the lowest free slot
        elif free is not None and lease.slot in free:
            free.remove(lease.slot)
            heapq.heapify(free)

    def vacate(self, lease: Lease) -> bool:
        """Frees the slot if `lease` holds it; returns whether it did. A slot beyond the pool's
        current size (fewer slots configured since it was granted) is not made free again."""
        key = lease.slot_key
        if self._holders.get(key) is not lease:
            return False
        del self._holders[key]
        pool = (lease.device_key, lease.kind)
        if pool in self._free and lease.slot < self._capacity[pool]:
            heapq.heappush(self._free[pool], lease.slot)
        return True

    # -- choosing a device ---------------------------------------------------------------------

    def candidates(self, kind: SlotKind, selector: DeviceSelector) -> list[DeviceSpec]:
        """The devices a request may ever be granted on; NoSuchDevice if none could be."""
        cached = self._candidates.get((kind, selector))
        if cached is not None:
            return cached
        found = [spec for spec in self._specs.values()
                 if self._capacity.get((spec.key, kind), 0) > 0 and self.selects(spec, selector)]
        if not found:
            raise NoSuchDevice(f"no device with {kind.value} slots matches {selector.describe()}")
        if selector.min_free_memory_bytes > max(spec.memory_total_bytes for spec in found):
            raise NoSuchDevice(f"no device with {kind.value} slots has {selector.min_free_memory_bytes} bytes "
                               f"of memory in total ({selector.describe()})")
        self._candidates[(kind, selector)] = found
        return found

    def pick(self, request: AcquireRequest, candidates: list[DeviceSpec]) -> tuple[DeviceSpec, int] | None:
        """A free slot for `request`: the device with the most free memory, then the most free slots."""
        best: tuple[tuple[int, int, int], DeviceSpec] | None = None
        for spec in candidates:
            free = self._free[(spec.key, request.kind)]
            if not free or not self.has_memory(spec, request.selector):
                continue
            rank = (-self._free_memory(spec), -len(free), spec.index)
            if best is None or rank < best[0]:
                best = (rank, spec)
        if best is None:
            return None
        spec = best[1]
        return spec, self._free[(spec.key, request.kind)][0]

    def fits(self, spec: DeviceSpec, selector: DeviceSelector) -> bool:
        """Whether a request with `selector` may be granted on `spec` right now."""
        return self.selects(spec, selector) and self.has_memory(spec, selector)

    @staticmethod
    def selects(spec: DeviceSpec, selector: DeviceSelector) -> bool:
        if selector.index is not None:
            return spec.index == selector.index
        if selector.uuid is not None:
            return selector.uuid in (spec.uuid, spec.id)
        return True

    def has_memory(self, spec: DeviceSpec, selector: DeviceSelector) -> bool:
        if not selector.min_free_memory_bytes:
            return True
        return self._free_memory(spec) >= selector.min_free_memory_bytes

    def _free_memory(self, spec: DeviceSpec) -> int:
        return spec.memory_total_bytes - self._figures(spec.id).memory_used_bytes
