"""Fan-out of committed lease events to WatchLeases callers, resumable by seq.

Events reach the hub only after their transaction committed, so a watcher never sees an event
that a crash could take back. Each watcher first reads the persisted history after its
`after_seq`, then follows the live events through a bounded buffer. A slow watcher never blocks
the broker: when its buffer overflows the buffer is dropped and the watcher goes back to reading
the history from the store, so it still sees every event, in order, without gaps.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

from resource_svc.leases import BrokerClosed, LeaseEvent

ReadEvents = Callable[[int, int], list[LeaseEvent]]  # (after_seq, limit) -> events, blocking


class _Subscriber:
    def __init__(self, limit: int) -> None:
        self.buffer: deque[LeaseEvent] = deque()
        self.limit = limit
        self.overflowed = False
        self.ready = asyncio.Event()

    def push(self, events: Sequence[LeaseEvent]) -> None:
        if self.overflowed:
            return
        if len(self.buffer) + len(events) > self.limit:
            self.buffer.clear()  # it will catch up from the store instead
            self.overflowed = True
        else:
            self.buffer.extend(events)
        self.ready.set()


class EventHub:
    def __init__(self, read_events: ReadEvents, *, buffer_limit: int = 4096, page_size: int = 500) -> None:
        self._read_events = read_events
        self._buffer_limit = buffer_limit
        self._page_size = page_size
        self._subscribers: set[_Subscriber] = set()
        self._closed = False
        self.last_published = 0  # seq of the newest event handed to watchers

    @property
    def watchers(self) -> int:
        return len(self._subscribers)

    def publish(self, events: Sequence[LeaseEvent]) -> None:
        """Hands committed events to every watcher; never blocks."""
        if events:
            self.last_published = events[-1].seq
        for subscriber in self._subscribers:
            subscriber.push(events)

    def close(self) -> None:
        """Ends every watch with BrokerClosed."""
        self._closed = True
        for subscriber in self._subscribers:
            subscriber.ready.set()

    def watch(self, after_seq: int, live_only: bool = False) -> "Watch":
        """Events with seq > after_seq: the stored history, then live ones, in seq order.
        `live_only`: only events published from now on. The watcher is subscribed when this
        returns (iterate it, and close it when done)."""
        subscriber = _Subscriber(self._buffer_limit)
        self._subscribers.add(subscriber)  # before reading the history, so nothing falls in between
        start = self.last_published if live_only else after_seq
        return Watch(self, subscriber, start, skip_history=live_only)

    def _unsubscribe(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)

    async def _follow(self, subscriber: _Subscriber, last: int, skip_history: bool) -> AsyncIterator[LeaseEvent]:
        try:
            while True:
                if not skip_history:
                    async for event in self._history(last):
                        last = event.seq
                        yield event
                skip_history = False  # after an overflow, catching up from the store is the only way
                while not subscriber.overflowed:
                    if self._closed:
                        raise BrokerClosed("the broker is shutting down")
                    if not subscriber.buffer:
                        subscriber.ready.clear()
                        await subscriber.ready.wait()
                        continue
                    event = subscriber.buffer.popleft()
                    if event.seq <= last:
                        continue  # already read from the history
                    if event.seq != last + 1:
                        subscriber.buffer.clear()  # committed before we subscribed: in the store
                        break
                    last = event.seq
                    yield event
                subscriber.overflowed = False
        finally:
            self._unsubscribe(subscriber)

    async def _history(self, after_seq: int) -> AsyncIterator[LeaseEvent]:
        while True:
            if self._closed:
                raise BrokerClosed("the broker is shutting down")
            page = await asyncio.to_thread(self._read_events, after_seq, self._page_size)
            for event in page:
                after_seq = event.seq
                yield event
            if len(page) < self._page_size:
                return


class Watch:
    """One watcher's subscription: async-iterate it for events; `close()` unsubscribes (also
    when it was never iterated)."""

    def __init__(self, hub: EventHub, subscriber: _Subscriber, start: int, skip_history: bool) -> None:
        self._hub = hub
        self._subscriber = subscriber
        self._events = hub._follow(subscriber, start, skip_history)

    def __aiter__(self) -> AsyncIterator[LeaseEvent]:
        return self._events

    async def close(self) -> None:
        self._hub._unsubscribe(self._subscriber)
        await self._events.aclose()
