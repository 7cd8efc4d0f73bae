"""A decoder caption stream driven from asyncio, and noticing an HTTP client that left.

:class:`pllava_client.CaptionStream` is a blocking iterator; :class:`AsyncCaption` pulls
each piece on a worker thread of its own pool, so the event loop keeps serving while captions
run. :meth:`AsyncCaption.close` cancels the gRPC call -- the decoder frees the request's KV
slot at once -- and wakes a worker blocked on it. :func:`until_disconnected` returns when the
HTTP client closes its connection, so a request can be raced against it.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Awaitable, Callable, TypeVar

from pllava_client import CaptionResult, CaptionStream

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client closed its connection before the answer was ready."""


class AsyncCaption:
    """One ``Decoder.Caption`` call: ``await next_piece()`` until it returns None."""

    def __init__(self, stream: CaptionStream, executor: Executor):
        self._stream = stream
        self._executor = executor

    async def next_piece(self) -> str | None:
        """The next piece of text, None once the stream has ended; raises CaptionError."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._next_or_none)

    def _next_or_none(self) -> str | None:
        return next(self._stream, None)

    @property
    def result(self) -> CaptionResult | None:
        """The final event, once :meth:`next_piece` has returned None."""
        return self._stream.result

    @property
    def token_count(self) -> int:
        return len(self._stream.token_ids)

    def close(self) -> None:
        """Cancel the call if it is still running (harmless afterwards)."""
        self._stream.close()


async def until_disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return when the ASGI ``receive`` reports ``http.disconnect`` (the body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive: Callable[[], Awaitable[dict]]) -> T:
    """``await work``, or raise :class:`ClientGone` (cancelling ``work``) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone()
