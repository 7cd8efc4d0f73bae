"""The decoder's engine loop: one thread owns the device and steps the ``Engine``; asyncio
handlers submit requests and iterate over their tokens.

Thread model::

    event loop (gRPC handlers)                 engine thread
    --------------------------                 -------------
    admit()          -> Admission (or Overloaded)
    await encoder    (other requests keep decoding meanwhile)
    submit(request)  -> engine.add, wake  ---> while engine.has_work(): events = engine.step()
    async for event in stream   <------------ loop.call_soon_threadsafe(queue.put_nowait, event)
    (cancelled / deadline) -> engine.cancel -> the slot is freed at the next step

The engine thread sleeps on a condition variable while the engine has nothing to do, so an
idle server uses no CPU. Encoder calls never happen on the engine thread: a request enters
the engine only once its visual tokens are in hand, so running sequences keep decoding
while new videos are being encoded (the two stages pipeline).

Metrics: after each step the thread records the step's prefill and decode seconds
(``Engine.last_step``) in :class:`DecoderMetrics`, whose gauges read the waiting count and the
engine's slots when Prometheus scrapes.

Admission control: a request counts as *waiting* from ``admit()`` (before its video is
encoded) until its first token (its prompt then fed into a KV slot) or its end. When
``max_queue`` requests are already waiting, ``admit()`` raises :class:`Overloaded`
(RESOURCE_EXHAUSTED on the wire) instead of letting the queue grow without bound.

Failures: a sequence the engine ends with ``FinishReason.ERROR`` (its sampling or text
failed, or the decode call it was part of) raises :class:`InternalError` from its stream
alone; the engine has already freed its slot and goes on with the others. Should
``engine.step()`` itself raise (a bug outside any one sequence's work), every request in the
engine fails and is cancelled, and the loop keeps serving new ones.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from pllava.generation import Engine, FinishReason, Request, TokenEvent
from pllava_serving.errors import InternalError, Overloaded

from .metrics import DecoderMetrics

log = logging.getLogger(__name__)


class Admission:
    """One request's place in the waiting count; ``release()`` is idempotent."""

    def __init__(self, release: Callable[[], None]):
        self._release = release
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RequestStream:
    """Async iterator over one request's :class:`TokenEvent` s, ending after the event that
    carries a finish reason. Leaving it early (``cancel()``, ``aclose()``, the ``async with``
    block, or the awaiting task being cancelled) cancels the request in the engine."""

    def __init__(self, owner: "EngineLoop", request_id: str, queue: asyncio.Queue, admission: Admission):
        self._owner = owner
        self.request_id = request_id
        self._queue = queue
        self._admission = admission
        self.done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # CancelledError: the client went away or its deadline passed
            self.cancel()
            raise
        self._admission.release()  # it holds a slot now (or has ended)
        if isinstance(item, BaseException):
            self._finish()
            # An engine-wide failure cancels what the engine holds; a request added just after
            # would decode on for nobody. Cancelling an id the engine no longer has is harmless.
            self._owner.engine.cancel(self.request_id)
            raise item
        if item.finish_reason is not None:
            self._finish()
        return item

    def cancel(self) -> None:
        """Stop the request now; its KV slot is freed at the engine's next step."""
        if not self.done:
            self._finish()
            self._owner.cancel(self.request_id)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    def _finish(self) -> None:
        self.done = True
        self._admission.release()
        self._owner._forget(self.request_id)


class EngineLoop:
    """Runs ``engine.step()`` on a dedicated thread and streams each request's tokens to the
    asyncio task that submitted it."""

    def __init__(self, engine: Engine, max_queue: int, metrics: DecoderMetrics | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics if metrics is not None else DecoderMetrics()
        self._wake = threading.Condition()
        self._lock = threading.Lock()  # guards _streams and _waiting
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._waiting = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.steps = 0
        self.metrics.watch(self)  # its gauges read the queue and the slots from here on

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread after its current step; requests still running are abandoned."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- event-loop side --------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        """Requests admitted that have no token yet (encoding, queued, or their prompt being fed)."""
        return self._waiting

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_streams(self) -> int:
        """Requests whose events are still delivered to a handler."""
        with self._lock:
            return len(self._streams)

    def held(self, settle_s: float = 2.0) -> dict[str, int]:
        """What is still held -- KV slots, waiting places, open streams -- once the engine
        has applied pending cancellations (waits up to ``settle_s``). All zero on a server
        with no caption in flight; anything else is a leak."""
        deadline = time.monotonic() + settle_s
        while self.engine.has_work() and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"slots": self.engine.num_running, "slots_total": self.engine.num_slots,
                "waiting": self._waiting, "streams": self.num_streams}

    def admit(self) -> Admission:
        """Count a new request as waiting; raise Overloaded when ``max_queue`` already are."""
        with self._lock:
            if self._waiting >= self.max_queue:
                raise Overloaded(
                    f"the decoder is busy: {self._waiting} requests are already waiting for one of "
                    f"{self.engine.num_slots} sequence slots (max queue {self.max_queue}); retry later")
            self._waiting += 1
        return Admission(self._release_waiting)

    def _release_waiting(self) -> None:
        with self._lock:
            self._waiting -= 1

    def submit(self, request: Request, admission: Admission | None = None) -> RequestStream:
        """Queue ``request`` in the engine and return the stream of its events.

        Call from a coroutine (the events are delivered to the running event loop). Raises
        ContextOverflowError (the prompt does not fit), Overloaded (no ``admission`` given
        and the queue is full) or ValueError (``request.request_id`` is already streaming)
        before anything is queued.
        """
        admission = admission if admission is not None else self.admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = request.request_id
        with self._lock:
            if rid in self._streams:
                admission.release()
                raise ValueError(f"request id {rid!r} is already in use")
            self._streams[rid] = (loop, queue)
        try:
            self.engine.add(request)
        except BaseException:
            self._forget(rid)
            admission.release()
            raise
        with self._wake:
            self._wake.notify()
        return RequestStream(self, rid, queue, admission)

    def cancel(self, request_id: str) -> None:
        self._forget(request_id)
        self.engine.cancel(request_id)
        with self._wake:
            self._wake.notify()

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.engine.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                events = self.engine.step()
            except Exception as exc:  # a device or model failure: fail everything in flight
                log.exception("engine step failed; failing every request in flight")
                self._fail_all(exc)
                continue
            self.steps += 1
            self.metrics.record_step(self.engine.last_step, sum(e.token_id is not None for e in events))
            for event in events:
                if event.finish_reason == FinishReason.CANCELLED:
                    log.info("%s cancelled after %d generated tokens; its KV slot is free",
                             event.request_id, event.stats.generated_tokens)
                if event.error is not None:
                    self._deliver(event.request_id, InternalError(str(event.error)))
                else:
                    self._deliver(event.request_id, event)

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:  # cancelled or forgotten: nobody listens
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutdown): nobody will read on
            self._forget(request_id)
            self.engine.cancel(request_id)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self.engine.cancel(rid)
            self._deliver(rid, InternalError(f"the decoding engine failed: {type(exc).__name__}: {exc}"))
