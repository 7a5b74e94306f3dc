"""Long work (a tracking call, a training run) that streams events to an RPC while it runs in a
task of its own, and blocking work that must stop before the resources it runs under go.

    runs = EventRuns(stopped=lambda: Cancelled("the service is shutting down"))
    async for event in runs.stream(produce, name="track jobs/x"):   # produce(emit) does the work
        ...
    await runs.close()                                               # shutdown: cancels every run

Why a task of its own: the lease client cancels the task that holds a lease when the lease is
lost, and that must be the work, not the RPC handler streaming its events. Closing the iterator
(the client went away) cancels the run and waits for it, so its `finally` blocks (lease release,
child processes, temp dirs) have finished before the handler returns.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from mocap_common.procs import finish_uncancellable

E = TypeVar("E")
R = TypeVar("R")
_END = object()


class EventRuns(Generic[E]):
    """Runs event producers as tasks and tracks them for shutdown."""

    def __init__(self, stopped: Callable[[], BaseException]) -> None:
        """`stopped()` is the error a consumer sees when close() cancels its run."""
        self._stopped = stopped
        self._runs: set[asyncio.Task[None]] = set()

    async def stream(self, produce: Callable[[Callable[[E], None]], Awaitable[None]], name: str) -> AsyncIterator[E]:
        """Yields what `produce(emit)` emits; re-raises what it raises; ends when it returns."""
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def run() -> None:
            try:
                await produce(queue.put_nowait)
            except asyncio.CancelledError:
                raise
            except BaseException as error:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait(error)
            else:
                queue.put_nowait(_END)

        task = asyncio.create_task(run(), name=name)
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        # A run cancelled from elsewhere (shutdown, lease loss handled inside) must still end the stream.
        task.add_done_callback(lambda t: queue.put_nowait(self._stopped()) if t.cancelled() else None)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            if not task.done():
                task.cancel()
            await finish_uncancellable(asyncio.gather(task, return_exceptions=True))

    async def close(self) -> None:
        """Cancels every run and waits for each to release what it holds."""
        for task in list(self._runs):
            task.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)


async def run_stoppable_thread(work: Callable[[threading.Event], R],
                               on_stop: Callable[[], None] = lambda: None) -> R:
    """Runs blocking `work(stop)` in a worker thread. If the caller is cancelled (or fails), `stop`
    is set, `on_stop()` wakes whatever the thread may be blocked on, and the thread is waited for
    before the cancellation goes on: nothing keeps running on a device (or under a lease) after
    its owner has moved on. `work` must check `stop` often."""
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, work, stop)
    try:
        return await asyncio.shield(future)
    except BaseException:
        stop.set()
        on_stop()
        await asyncio.gather(future, return_exceptions=True)
        raise
