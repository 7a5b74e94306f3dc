"""The lease book: every lease the broker can name — the active ones and the newest ended ones —
and which lease each request_id was granted (for idempotent retries).

Plain synchronous state, owned by the broker's event loop. The broker mutates the `Lease` objects
kept here; whatever leaves the book for a caller is a `snapshot()`.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Collection, Iterable

from resource_svc.leases import Lease, LeaseState


class LeaseBook:
    """Active leases by name, ended ones by name (oldest end first, `ended_kept` at most), and
    request_id -> lease name for both."""

    def __init__(self, ended_kept: int) -> None:
        self._ended_kept = ended_kept
        self._active: dict[str, Lease] = {}
        self._ended: OrderedDict[str, Lease] = OrderedDict()
        self._by_request: dict[str, str] = {}

    def find(self, name: str) -> Lease | None:
        return self._active.get(name) or self._ended.get(name)

    def granted_to(self, request_id: str) -> Lease | None:
        """The lease (active or remembered ended) granted to `request_id`, if any."""
        name = self._by_request.get(request_id)
        return None if name is None else self.find(name)

    def active(self) -> Collection[Lease]:
        return self._active.values()

    def add_active(self, lease: Lease) -> None:
        self._active[lease.name] = lease
        if lease.request_id:
            self._by_request[lease.request_id] = lease.name

    def end(self, lease: Lease) -> None:
        """Moves an active lease (already marked ended) to the ended ones."""
        del self._active[lease.name]
        self.remember_ended(lease)

    def remember_ended(self, lease: Lease) -> None:
        """Keeps an ended lease, forgetting the oldest ones past `ended_kept` (the store prunes
        as many, so a restarted broker remembers the same ones)."""
        self._ended[lease.name] = lease
        if lease.request_id:
            self._by_request[lease.request_id] = lease.name
        while len(self._ended) > self._ended_kept:
            _, old = self._ended.popitem(last=False)
            if old.request_id and self._by_request.get(old.request_id) == old.name:
                del self._by_request[old.request_id]

    def list(self, *, state: LeaseState | None, device: str, limit: int,
             before_grant_seq: int | None) -> list[Lease]:
        """Snapshots newest first (by grant), optionally of one state or device, before a page mark."""
        pool: Iterable[Lease]
        if state is LeaseState.ACTIVE:
            pool = self._active.values()
        elif state is not None:
            pool = (lease for lease in self._ended.values() if lease.state is state)
        else:
            pool = itertools.chain(self._active.values(), self._ended.values())
        chosen = [lease for lease in pool
                  if (not device or lease.device == device)
                  and (before_grant_seq is None or lease.grant_seq < before_grant_seq)]
        chosen.sort(key=lambda lease: lease.grant_seq, reverse=True)
        return [lease.snapshot() for lease in chosen[:limit]]

    def holder_pids(self, device_key: str) -> set[int]:
        """The pids holding active leases on a device (holders that gave no pid are left out)."""
        return {lease.holder.pid for lease in self._active.values()
                if lease.device_key == device_key and lease.holder.pid > 0}
