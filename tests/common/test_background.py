"""EventRuns and run_stoppable_thread: work in its own task, stopped and waited for on every path."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mocap_common.background import EventRuns, run_stoppable_thread


class Stopped(Exception):
    pass


async def test_events_flow_and_errors_reach_the_consumer():
    runs: EventRuns[int] = EventRuns(lambda: Stopped("shutdown"))

    async def produce(emit):
        for i in range(3):
            emit(i)
        raise ValueError("bad input")

    got = []
    with pytest.raises(ValueError, match="bad input"):
        async for event in runs.stream(produce, "test"):
            got.append(event)
    assert got == [0, 1, 2]


async def test_closing_the_stream_cancels_the_run_and_waits_for_its_cleanup():
    runs: EventRuns[int] = EventRuns(lambda: Stopped("shutdown"))
    cleaned = asyncio.Event()

    async def produce(emit):
        emit(1)
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.05)  # a release step that takes a moment
            cleaned.set()

    stream = runs.stream(produce, "test")
    assert await anext(stream) == 1
    await stream.aclose()
    assert cleaned.is_set()


async def test_shutdown_ends_every_stream_with_the_stopped_error():
    runs: EventRuns[int] = EventRuns(lambda: Stopped("shutdown"))

    async def produce(emit):
        await asyncio.sleep(60)

    consumer = asyncio.ensure_future(anext(runs.stream(produce, "test")))
    await asyncio.sleep(0.05)
    await runs.close()
    with pytest.raises(Stopped):
        await consumer


async def test_cancelled_owner_stops_and_waits_for_the_thread():
    finished = threading.Event()

    def work(stop: threading.Event) -> None:
        while not stop.is_set():
            time.sleep(0.01)
        time.sleep(0.1)  # still winding down when stop is noticed
        finished.set()

    task = asyncio.ensure_future(run_stoppable_thread(work))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()  # the thread was done before the cancellation went on
