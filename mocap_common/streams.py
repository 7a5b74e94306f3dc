"""A client-streaming call's request stream, drained before the call ends so the client gets the
status the server sent.

grpc/grpc#36066: when a server ends a call (a refusal, an error, an early answer) while a grpc.aio
client is still writing, the client's failed write can overwrite the status it already received
with INTERNAL "Internal error from Core", no ErrorInfo. Which one the client sees depends on
timing (from one call in six to most calls in our tests). A handler that reads the rest of the stream first —
until the client half-closes — answers with its own status every time.

    async def Export(self, request_iterator, context):
        async with draining(request_iterator) as requests:
            ...  # read `requests`, raise ServiceError to refuse, yield responses

Whenever the block ends other than by cancellation (normal end, ServiceError, any other error)
the rest of the stream is read and dropped, after the block's own cleanup (leases, temp files,
upload rows) has run. Draining is bounded, so a hostile client cannot hold the handler:

- `seconds` in all;
- `idle_seconds` since the last message: a client that is not writing cannot lose the race (a write
  after the client has seen the status fails harmlessly), and a bidi client that waits for our
  next response before sending more does not keep the call open;
- `max_bytes` dropped.

Past a limit the call ends anyway (and a client still writing may see INTERNAL; that is logged).

Reads are safe to cancel: a consumer cancelled while it waits for a message (the tracker's feeder
task when the pipeline fails) leaves that read running, and the next read or the drain takes its
message. A grpc.aio request iterator cancelled mid-read is closed for good, so nothing could be
drained after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message
from grpc.aio import AbortError

from mocap_common.logs import get_logger

log = get_logger(__name__)

M = TypeVar("M", bound=Message)
_END = object()


@dataclass(frozen=True)
class DrainLimits:
    """How long and how much a drain may read (see the module doc)."""

    seconds: float = 10.0
    idle_seconds: float = 2.0
    max_bytes: int = 64 * 1024 * 1024


DRAIN_LIMITS = DrainLimits()


class RequestStream(Generic[M]):
    """An async iterator over a call's requests whose reads survive the reader's cancellation."""

    def __init__(self, messages: AsyncIterable[M]) -> None:
        self._source = aiter(messages)
        self._pending: asyncio.Future[object] | None = None
        self._ended = False
        self._last_read_at = asyncio.get_running_loop().time()  # when a message last arrived

    def __aiter__(self) -> "RequestStream[M]":
        return self

    async def __anext__(self) -> M:
        item = await self._next()
        if item is _END:
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    async def _next(self) -> object:
        if self._ended:
            return _END
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read())
            self._pending.add_done_callback(_retrieve)
        read = self._pending
        try:
            item = await asyncio.shield(read)  # a cancelled caller leaves the read running
        except BaseException:
            if read.done() and (read.cancelled() or read.exception() is not None):
                self._pending, self._ended = None, True  # the stream itself failed: nothing more to read
            raise
        self._pending = None
        self._ended = item is _END
        return item

    async def _read(self) -> object:
        try:
            message = await anext(self._source)
        except StopAsyncIteration:
            return _END
        self._last_read_at = asyncio.get_running_loop().time()
        return message

    async def drain(self, limits: DrainLimits = DRAIN_LIMITS) -> str:
        """Reads and drops the rest of the stream, within `limits` (see the module doc). Returns
        the limit that stopped it ("seconds", "max_bytes"), or "" when the client half-closed,
        went quiet or the stream broke."""
        try:
            limit, dropped = await self._drop_rest(limits)
        except Exception:  # noqa: BLE001 - a broken stream has nothing left to drain
            return ""
        finally:
            self.close()
        if limit:
            log.warning("request stream not drained before the call ended; a client still writing may see INTERNAL",
                        limit=limit, dropped_bytes=dropped)
        return limit

    async def _drop_rest(self, limits: DrainLimits) -> tuple[str, int]:
        """("", bytes) once the client half-closed or went quiet, else the limit reached."""
        loop = asyncio.get_running_loop()
        deadline, dropped = loop.time() + limits.seconds, 0
        while not self._ended:
            now = loop.time()
            if now >= deadline:
                return "seconds", dropped
            if dropped > limits.max_bytes:
                return "max_bytes", dropped
            quiet_left = self._last_read_at + limits.idle_seconds - now
            if quiet_left <= 0 and not (self._pending is not None and self._pending.done()):
                return "", dropped  # quiet that long: the client is not writing
            try:
                async with asyncio.timeout(max(0.0, min(quiet_left, deadline - now))):
                    item = await self._next()
            except TimeoutError:
                continue
            if isinstance(item, Message):
                dropped += item.ByteSize()
        return "", dropped

    def close(self) -> None:
        """Stops a read still waiting (the call is ending)."""
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = None


@contextlib.asynccontextmanager
async def draining(messages: AsyncIterable[M], limits: DrainLimits = DRAIN_LIMITS) -> AsyncIterator[RequestStream[M]]:
    """The call's requests as a RequestStream, drained (within `limits`) when the block ends other
    than by cancellation, before the error or the answer goes to the client."""
    stream: RequestStream[M] = RequestStream(messages)
    try:
        yield stream
    except AbortError:  # context.abort() already sent the status: too late to drain
        stream.close()
        raise
    except Exception:
        await stream.drain(limits)
        raise
    except BaseException:  # cancelled, or the client went away: nobody is waiting for a status
        stream.close()
        raise
    else:
        await stream.drain(limits)


def _retrieve(read: asyncio.Future[object]) -> None:
    """Marks a read's error as seen: a read dropped at the end of a call must not log one."""
    if not read.cancelled():
        read.exception()
