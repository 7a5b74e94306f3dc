"""How a run under a lease ended, counted in one place for every service that holds leases.

    RUNS = Counter("mocap_tracker_calls_total", "Track calls by outcome.", ["outcome"])
    with LeaseRunOutcome(RUNS, log, "track call finished") as run:
        async with lease(...) as held, ACTIVE.track_inprogress():
            ...
            run.succeeded()

The outcome label is one of `succeeded` (the body called `succeeded()`), `cancelled` (the run
was cancelled: caller gone, shutdown), `lease_lost` (LeaseLost) or `failed` (anything else,
including a body that ended without calling `succeeded()`). Any other failure after
`succeeded()` (a lease release that raised) keeps `succeeded`: the work itself was done.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from prometheus_client import Counter

from mocap_common.lease_client import LeaseLost

class LeaseRunOutcome:
    """Counts (and logs) the outcome of the run it wraps; see the module docstring."""

    def __init__(self, runs: Counter, log: Any, message: str) -> None:
        """`runs` has one label, `outcome`; `log.info(message, outcome=...)` is written at the end."""
        self._runs = runs
        self._log = log
        self._message = message
        self.outcome = "failed"

    def succeeded(self) -> None:
        self.outcome = "succeeded"

    def __enter__(self) -> LeaseRunOutcome:
        self.outcome = "failed"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            self.outcome = "cancelled"
        elif exc_type is not None and issubclass(exc_type, LeaseLost):
            self.outcome = "lease_lost"
        self._runs.labels(self.outcome).inc()
        self._log.info(self._message, outcome=self.outcome)
