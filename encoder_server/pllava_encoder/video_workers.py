"""The encoder's video-worker processes, each replaced on its own.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its processes dies, the whole
pool breaks and every video in it fails, and it cannot stop one job that runs too long. Here
each worker is a process with a pipe of its own, so

* a job that overruns the time budget (``decode_timeout_s``) is stopped by killing its
  worker, and only that job fails (:class:`DecodeTimeout`);
* a worker that dies (FFmpeg crashed on a malformed file, the kernel killed it) fails only
  the job it was running (:class:`WorkerDied`); with ``run(..., retry=True)`` the job is
  first run once more on the fresh worker started in the dead one's place, never on one of
  the others, so a file that crashes the decoder every time costs one worker and that fresh
  one, not two of the pool;
* either way a fresh worker takes the dead one's place, and the others carry on.

Every way a job can end gives its worker back or replaces it: a caller cancelled at any
point, or a failure this module did not foresee (a job that cannot be pickled, say), never
leaves a worker marked busy for good, which would shrink the pool and, once it is empty,
make every later job wait forever.

Jobs wait for an idle worker in arrival order. A job whose caller goes away keeps its worker
until it ends (or its budget runs out), so a worker never runs two jobs at once. Workers are
started with "spawn" (forking a process that runs MindSpore's threads is unsafe) and run
:func:`pllava_encoder.video_worker.serve`; a worker whose server dies, however it dies, ends
with it, in the middle of a job too (:mod:`pllava_serving.parent_death`).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import video_worker

log = logging.getLogger(__name__)

#: Longest a new worker may take to import its modules and report ready.
START_TIMEOUT_S = 120.0
#: Pause before trying again when a replacement worker failed to start.
RESTART_BACKOFF_S = 1.0


class WorkerDied(RuntimeError):
    """The worker process running a job ended before answering."""


class DecodeTimeout(TimeoutError):
    """A job ran past the time budget; its worker was killed and replaced (DEADLINE_EXCEEDED)."""


class _Worker:
    """One worker process and this side of its pipe. Blocking methods run on threads."""

    def __init__(self, ctx, name: str):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=video_worker.serve, args=(child, os.getpid()), name=name, daemon=True)
        self.process.start()
        child.close()
        self.name = name

    def wait_ready(self, timeout: float) -> None:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"video worker {self.name} did not start within {timeout:g} s")
        message = self.conn.recv()
        if message != video_worker.READY:
            raise RuntimeError(f"video worker {self.name} said {message!r} instead of {video_worker.READY!r}")

    def call(self, job: tuple) -> tuple[bool, Any]:
        self.conn.send(job)
        return self.conn.recv()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask it to exit; kill it if it does not."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout)
        self.kill()


class VideoWorkerPool:
    """``size`` worker processes; ``await run((function, *arguments))`` runs a function of
    :mod:`pllava_encoder.video_worker` in one of them within ``timeout_s`` seconds."""

    def __init__(self, size: int, timeout_s: float):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.timeout_s = timeout_s
        self.replaced = 0  # workers killed or found dead and replaced (tests and logs read it)
        self._ctx = multiprocessing.get_context("spawn")
        self._serial = itertools.count(1)
        self._workers: set[_Worker] = set()
        self._busy: set[_Worker] = set()
        self._idle: asyncio.Queue[_Worker] | None = None
        # One thread per busy worker waits for its answer; a killed worker's thread ends at once.
        self._threads = ThreadPoolExecutor(2 * size + 2, thread_name_prefix="video-job")
        self._background: set[asyncio.Task] = set()
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The worker processes now alive or starting."""
        return sorted(w.process.pid for w in self._workers)

    @property
    def busy_pids(self) -> list[int]:
        """The worker processes running a job now."""
        return sorted(w.process.pid for w in self._busy)

    async def start(self) -> "VideoWorkerPool":
        """Start ``size`` workers; if one fails to start, stop those that did and raise its error."""
        self._idle = asyncio.Queue()
        started = await asyncio.gather(*(asyncio.to_thread(self._spawn) for _ in range(self.size)),
                                       return_exceptions=True)
        failures = [result for result in started if isinstance(result, BaseException)]
        if failures:
            await self.close()
            raise failures[0]
        for worker in started:
            self._idle.put_nowait(worker)
        return self

    async def close(self) -> None:
        """Stop every worker (a running job's caller gets WorkerDied) and the tasks replacing them."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        workers, self._workers = list(self._workers), set()
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers))
        self._threads.shutdown(wait=False)

    async def run(self, job: tuple, name: str = "video", retry: bool = False) -> Any:
        """The result of ``function(*arguments)`` (``job``) in a worker; re-raises the job's own error.

        Raises :class:`DecodeTimeout` past the budget and :class:`WorkerDied` if the worker
        ended first; the worker is replaced in both cases. With ``retry``, a job whose worker
        died is run once more, with a budget of its own, on the worker started in the dead
        one's place (a fresh process, not one of the others), and WorkerDied means that one
        died too.
        """
        if self._idle is None or self._closed:
            raise RuntimeError("the video workers are not running")
        worker = await self._idle.get()
        while not worker.process.is_alive():  # it died while idle: not this job's doing
            self._replace(worker, f"it died while idle ({_exit_reason(worker.process.exitcode)})")
            worker = await self._idle.get()
        if not retry:
            return await self._run_on(worker, job, name)
        # If ``worker`` dies, its replacement is handed to this job through ``fresh`` instead of
        # joining the idle queue; a replacement nobody claims (``fresh`` cancelled) joins it.
        fresh: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        try:
            try:
                return await self._run_on(worker, job, name, fresh)
            except WorkerDied as exc:
                log.error("%s (attempt 1 of 2); running it again on the fresh worker started in its place", exc)
            return await self._run_on(await self._claim(fresh), job, name)
        finally:
            if not fresh.done():
                fresh.cancel()

    # ---- internals ----------------------------------------------------------------------------
    async def _run_on(self, worker: _Worker, job: tuple, name: str,
                      fresh: asyncio.Future | None = None) -> Any:
        """Run ``job`` on ``worker`` (taken from the idle queue or claimed); whatever happens,
        the worker is given back or replaced (its replacement goes to ``fresh`` if given)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        self._busy.add(worker)
        settled = False  # the worker was given back, replaced, or handed to _reclaim
        try:
            call = loop.run_in_executor(self._threads, worker.call, job)
            call.add_done_callback(_retrieve)
            try:
                ok, value = await asyncio.wait_for(asyncio.shield(call), self.timeout_s)
            except asyncio.TimeoutError:
                settled = True
                self._replace(worker, f"it overran the {self.timeout_s:g} s budget on {name}")
                raise DecodeTimeout(
                    f"{name}: decoding took longer than this encoder's budget of {self.timeout_s:g} s per video "
                    "(decode_timeout_s), so its worker was stopped and replaced; a long, large or unusually "
                    "encoded video may need fewer frames or a larger budget") from None
            except asyncio.CancelledError:  # the caller went away: the worker is busy until the job ends
                settled = True
                self._keep(self._reclaim(worker, call, deadline, name))
                raise
            except (EOFError, OSError) as exc:
                died = exc
            else:
                settled = True
                self._give_back(worker)
                if ok:
                    return value
                raise value
            try:
                await asyncio.to_thread(worker.process.join, 5)
            finally:  # replaced even if the caller is cancelled while waiting for the exit status
                settled = True
                why = f"it died while decoding {name} ({_exit_reason(worker.process.exitcode)})"
                self._replace(worker, why, fresh)
            raise WorkerDied(f"the video worker died while decoding {name} "
                             f"({_exit_reason(worker.process.exitcode)})") from died
        except BaseException as exc:
            if not settled:  # not foreseen (e.g. a job that cannot be pickled): the pipe's state is unknown
                self._replace(worker, f"its job on {name} failed here: {_describe(exc)}")
            raise

    async def _claim(self, fresh: asyncio.Future) -> _Worker:
        """The replacement worker ``fresh`` resolves to; if the caller goes away first, the
        replacement goes to the idle queue (now, or when it has started)."""
        try:
            return await asyncio.shield(fresh)
        except asyncio.CancelledError:
            if fresh.done() and not fresh.cancelled() and fresh.exception() is None:
                self._give_back(fresh.result())
            else:
                fresh.cancel()
            raise

    def _spawn(self) -> _Worker:
        """Start a worker and wait until it is ready (blocking: run on a thread)."""
        worker = _Worker(self._ctx, f"video-worker-{next(self._serial)}")
        self._workers.add(worker)
        try:
            if self._closed:  # close() ran while it started and could not see it
                raise RuntimeError("the video workers are not running")
            worker.wait_ready(START_TIMEOUT_S)
        except BaseException:
            self._workers.discard(worker)
            worker.kill()
            raise
        return worker

    def _replace(self, worker: _Worker, why: str, fresh: asyncio.Future | None = None) -> None:
        """Kill ``worker`` and start another in its place (in the background); the new one
        goes to ``fresh`` if that is given and still waiting, else to the idle queue."""
        self.replaced += 1
        self._busy.discard(worker)
        log.warning("replacing video worker %s (pid %s): %s", worker.name, worker.process.pid, why)
        self._workers.discard(worker)
        self._keep(self._respawn(worker, fresh))

    async def _respawn(self, dead: _Worker, fresh: asyncio.Future | None = None) -> None:
        try:
            await asyncio.to_thread(dead.kill)
            while not self._closed:
                try:
                    worker = await asyncio.to_thread(self._spawn)
                except Exception:
                    log.exception("a replacement video worker failed to start; trying again")
                    await asyncio.sleep(RESTART_BACKOFF_S)
                    continue
                if self._closed:
                    await asyncio.to_thread(worker.stop)
                    return
                if fresh is not None and not fresh.done():
                    fresh.set_result(worker)
                else:
                    self._idle.put_nowait(worker)
                return
        finally:
            if fresh is not None and not fresh.done():  # closed first: its claimant must not wait forever
                fresh.set_exception(RuntimeError("the video workers are not running"))
                fresh.exception()  # seen, even if its claimant has gone

    async def _reclaim(self, worker: _Worker, call: asyncio.Future, deadline: float, name: str) -> None:
        """Wait for an abandoned job to end, then give its worker back (or replace it)."""
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(asyncio.shield(call), left)
        except asyncio.TimeoutError:
            self._replace(worker, f"it overran the {self.timeout_s:g} s budget on {name} (its caller had left)")
        except asyncio.CancelledError:  # the pool is closing (close() stops every worker)
            if not self._closed:
                self._replace(worker, f"waiting for its job on {name} was cancelled (its caller had left)")
            raise
        except (EOFError, OSError):
            self._replace(worker, f"it died while decoding {name} (its caller had left)")
        except Exception as exc:  # not foreseen: the pipe's state is unknown
            self._replace(worker, f"its job on {name} failed here: {_describe(exc)} (its caller had left)")
        else:
            self._give_back(worker)

    def _give_back(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        if not self._closed:
            self._idle.put_nowait(worker)

    def _keep(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _retrieve(future: asyncio.Future) -> None:
    """Mark an abandoned job's outcome as seen (no 'exception never retrieved' warnings)."""
    if not future.cancelled():
        future.exception()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "no exit status yet"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"
