"""Caption a whole collection of videos: which files, the JSON-lines record, the calls.

    paths = expand_inputs(["videos/", "more/*.webm", "list.txt"])
    with CaptionFile("captions.jsonl") as out:            # locked: one run per file
        done = out.read(request_settings(None, {"max_new_tokens": 128}))  # earlier runs' captions
        with Client("dns:///decoders:50052") as client:   # with the same settings
            for item in client.caption_many(paths, max_new_tokens=128, skip=done.skip):
                if item.status != "skipped":
                    out.append(item.to_json())             # one line per video, as it finishes

The record is one JSON object per line and per video: ``path``, ``size`` and ``sha256`` of
the file, then ``status`` ``"ok"`` with the caption, token counts, finish reason and
timings, or ``"error"`` with ``code`` (the gRPC status name, or ``FILE_ERROR`` when the file
could not be read or sent) and ``message``. Each line goes to the file in one ``write`` on a
descriptor opened with O_APPEND, so a process killed at any moment leaves whole lines (and at
worst, after a machine crash, one torn last line, which reading skips and appending ends).
Each line also records ``realpath`` (the file's absolute path, links resolved) and
``settings`` (the prompt and the request's fields). A rerun skips the videos whose file
(``realpath``) and content (``sha256``) already have an ``ok`` line made with the same
settings, which is how ``pllava-caption --out`` resumes: the same file named another way (a
relative path, a link, another working folder) is still the same video, and new settings
caption it again. A path whose name is not UTF-8 (bytes Python keeps as
surrogate escapes) is written with JSON's ``\\u`` escapes, so that reading gives it back.

Imports only the standard library and the client (no MindSpore).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import numbers
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import grpc

from .client import CaptionError, CaptionResult, CaptionStream, too_large_message

if TYPE_CHECKING:
    from .client import Client

#: File name endings a folder is searched for: the containers and still-image formats the
#: servers decode (decord/FFmpeg for video, Pillow for images). Files named one by one, in a
#: list or by a glob are taken whatever their ending.
VIDEO_SUFFIXES = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts",
    ".mts", ".m2ts", ".3gp", ".ogv", ".gif",
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

#: ``code`` of an error that happened before any call: the file could not be read or is
#: larger than one request may carry.
FILE_ERROR = "FILE_ERROR"

#: Statuses worth another try: the decoder was down, restarting, shutting down or full, or the
#: stream broke off. The others (INVALID_ARGUMENT: not a video, ...) would fail again.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED})
#: Of those, the ones that say the service is down or full rather than anything about the
#: video: a call failing so is tried again, without counting as one of the video's retries,
#: until the trouble has lasted ``wait_down_s``; then the whole run stops
#: (:class:`CollectionStopped`) instead of recording an error for every video left.
SERVICE_DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Error codes that may be the video's own fault (DEADLINE_EXCEEDED: a long video past the
#: encoder's decode budget or --timeout); any other ending a run of failed videos in a row
#: (``max_failures_in_a_row``) says the deployment is broken, and the run stops.
VIDEO_FAULTS = frozenset({FILE_ERROR, "INVALID_ARGUMENT", "OUT_OF_RANGE", "DEADLINE_EXCEEDED"})
#: How long a decoder may stay down (or full) before a collection run stops.
DEFAULT_WAIT_DOWN_S = 300.0

#: Seconds before the first retry; each later one waits twice as long, up to MAX_BACKOFF_S.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0


# ---- which files ---------------------------------------------------------------------------

def expand_inputs(args: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = (),
                  unsearchable: list[str] | None = None) -> list[str]:
    """The video paths that ``args`` name, in order, each once.

    An argument is a folder (searched recursively for :data:`VIDEO_SUFFIXES`, hidden entries
    left out, in sorted order), a ``.txt`` list (one path per line, relative to the list's
    folder; blank lines and ``#`` comments ignored; a folder in it is searched), a glob
    pattern (``**`` recursive), or a file. A path that does not exist is kept, so that its
    error is recorded like any other; a pattern that matches nothing is a ValueError. Files
    in ``exclude`` (the output file) are left out. A folder that cannot be searched is a
    ValueError, or, given an ``unsearchable`` list, a message appended to it (and the search
    goes on).
    """
    skip = {os.path.realpath(p) for p in exclude}
    found: dict[str, str] = {}  # real path -> the first spelling met

    def add(path: str) -> None:
        path = os.path.normpath(path)
        real = os.path.realpath(path)
        if real not in skip:
            found.setdefault(real, path)

    for arg in map(os.fspath, args):
        if os.path.isdir(arg):
            for path in _walk(arg, unsearchable):
                add(path)
        elif os.path.isfile(arg) and arg.lower().endswith(".txt"):
            for entry in _read_list(arg):
                if os.path.isdir(entry):
                    for path in _walk(entry, unsearchable):
                        add(path)
                else:
                    add(entry)
        elif os.path.exists(arg) or not glob.has_magic(arg):
            add(arg)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise ValueError(f"no file matches {arg!r}")
            for match in matches:
                for path in (_walk(match, unsearchable) if os.path.isdir(match) else [match]):
                    add(path)
    return list(found.values())


def _walk(folder: str, unsearchable: list[str] | None = None) -> Iterator[str]:
    """The video files under ``folder``. Linked folders are searched too (each real folder
    once: a link loop ends); a folder that cannot be read is a ValueError, or a message in
    ``unsearchable``, so that a collection never quietly loses part of itself."""
    def refuse(err: OSError) -> None:
        message = f"cannot search the folder {err.filename}: {err.strerror or err}"
        if unsearchable is None:
            raise ValueError(message)
        unsearchable.append(message)

    visited: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, onerror=refuse, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in visited:
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in VIDEO_SUFFIXES:
                yield os.path.join(root, name)


def _read_list(list_path: str) -> list[str]:
    base = os.path.dirname(list_path)
    with open(list_path, encoding="utf-8", errors="surrogateescape") as f:  # names need not be UTF-8
        lines = [line.strip() for line in f]
    return [os.path.join(base, os.path.expanduser(line)) for line in lines if line and not line.startswith("#")]


# ---- the record ------------------------------------------------------------------------------

@dataclass
class VideoResult:
    """What happened to one video of :meth:`Client.caption_many`.

    ``status`` is ``"ok"`` (``result`` holds the caption), ``"error"`` (``code`` and
    ``message`` say why) or ``"skipped"`` (``skip`` said so; nothing was sent).
    """

    path: str
    status: str
    size: int | None = None
    sha256: str | None = None
    result: CaptionResult | None = None
    code: str | None = None
    message: str | None = None
    attempts: int = 0
    prompt: str | None = None
    elapsed_s: float = 0.0
    #: The prompt and the request's fields (:func:`request_settings`): part of what a rerun
    #: compares before it skips a video.
    settings: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def num_generated_tokens(self) -> int:
        return len(self.result.token_ids) if self.result is not None else 0

    def to_json(self) -> dict:
        """The JSON line :class:`CaptionFile` records (not for skipped videos)."""
        line = dict(path=self.path, realpath=os.path.realpath(self.path), size=self.size, sha256=self.sha256,
                    status=self.status)
        if self.ok:
            r = self.result
            line.update(caption=r.caption, finish_reason=r.finish_reason,
                        num_prompt_tokens=len(r.prompt_token_ids), num_prompt_tokens_reused=r.num_prompt_tokens_reused,
                        num_generated_tokens=len(r.token_ids),
                        num_visual_tokens=r.num_visual_tokens, num_frames=r.num_frames,
                        visual_tokens_cached=r.visual_tokens_cached, timings=dict(r.timings),
                        prompt=self.prompt, model_id=r.model_id, request_id=r.request_id)
        else:
            line.update(code=self.code, message=self.message)
        if self.settings is not None:
            line.update(settings=self.settings)
        line.update(attempts=self.attempts, elapsed_s=round(self.elapsed_s, 3),
                    finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return line


#: The request fields :func:`request_settings` records, with the value that means "the
#: server's default" (what a field left out is recorded as).
SETTING_DEFAULTS = {"max_new_tokens": 0, "num_frames": 0, "repetition_penalty": None, "seed": None, "stop": [],
                    "temperature": None, "template": None, "top_k": None, "top_p": None}


def request_settings(prompt: str | None, kwargs: dict) -> dict:
    """What shapes a caption besides the video: the prompt and every request field (left
    out: the server's default, :data:`SETTING_DEFAULTS`), in the form a JSON line keeps them,
    so that a call that names a default and one that leaves it out record the same."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        return value

    given = {k: plain(v) for k, v in kwargs.items() if k != "timeout"}
    return {"prompt": prompt or None, **dict(sorted({**SETTING_DEFAULTS, **given}.items()))}


@dataclass
class Recorded:
    """What a caption file holds: (real path, sha256) pairs with an ok line made with the
    settings asked for, and with only errors."""

    ok: set[tuple[str, str]] = field(default_factory=set)
    failed: set[tuple[str, str]] = field(default_factory=set)
    #: Lines that are not a JSON object with path, sha256 and status (a torn last line).
    unreadable_lines: int = 0
    #: ok lines made with other settings than those asked for (they do not count as done).
    other_settings: int = 0

    def skip(self, path: str, sha256: str | None, retry_failed: bool = True) -> bool:
        """True if the video needs no new line: it has an ok line, or (``retry_failed``
        False) an error line (``sha256`` None: a file that cannot be read now, recorded so
        before)."""
        key = (os.path.realpath(path), sha256)
        return key in self.ok or (not retry_failed and key in self.failed)

    def has_caption(self, path: str, sha256: str | None) -> bool:
        return (os.path.realpath(path), sha256) in self.ok


class CaptionFile:
    """The JSON-lines file of a collection: read what is there, append a line per video."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def read(self, settings: dict | None = None) -> Recorded:
        """The pairs already recorded; a file that does not exist holds none. With
        ``settings`` (:func:`request_settings`), lines made with other settings are left out
        (lines that record none, from before settings were recorded, count as made with
        these)."""
        recorded = Recorded()
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return recorded
        with f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                    key = (line.get("realpath") or os.path.realpath(line["path"]), line["sha256"])
                    status = line["status"]
                except (ValueError, KeyError, TypeError, AttributeError):
                    recorded.unreadable_lines += 1
                    continue
                if settings is not None and line.get("settings", settings) != settings:
                    recorded.other_settings += status == "ok"
                    continue
                if status == "ok" and key[1]:
                    recorded.ok.add(key)
                elif status == "error" and (key[1] or line.get("code") == FILE_ERROR):  # (None: unreadable)
                    recorded.failed.add(key)
        recorded.failed -= recorded.ok
        return recorded

    def open(self) -> "CaptionFile":
        """Open for appending. A last line without its newline (torn by a crash) is ended
        first, so the next line starts on a line of its own."""
        if self._fd is None:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _lock_for_this_run(fd, self.path)
                if _ends_without_newline(self.path):
                    _write_all(fd, b"\n")
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self

    def append(self, line: dict) -> None:
        """Write ``line`` as one JSON line with a single ``write`` (flushed: no buffer)."""
        try:
            data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8: escaped, read back as it was
            data = (json.dumps(line) + "\n").encode("ascii")
        with self._lock:
            if self._fd is None:
                self.open()
            _write_all(self._fd, data)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "CaptionFile":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


class FileInUse(OSError):
    """Another run is appending to the same caption file."""


def _lock_for_this_run(fd: int, path: str) -> None:
    """One run at a time per file: two would both caption every video not yet done and
    record each twice. The lock goes with the descriptor (and with the process, however it
    ends). Where there is no ``fcntl`` (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FileInUse(f"{path} is being written by another run (pllava-caption --out or caption_many); "
                        "wait for it to end, or write to another file") from None
    except OSError as exc:  # a filesystem without locks (some NFS and FUSE mounts): go on unlocked
        logging.getLogger("pllava_client").warning("%s cannot be locked (%s): run one collection on it at a time",
                                                   path, exc.strerror or exc)


def _ends_without_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _write_all(fd: int, data: bytes) -> None:
    # A regular file takes the whole line in one write; the loop only guards odd filesystems.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---- the calls -------------------------------------------------------------------------------

class CollectionStopped(RuntimeError):
    """A :func:`caption_many` run stopped before its end because the service, not the
    videos, is in trouble: the decoder stayed unreachable or full for ``wait_down_s``, or
    ``max_failures_in_a_row`` videos failed one after the other. The videos not yet
    captioned got no result; a rerun (``pllava-caption --out``) takes them up."""


def caption_many(client: "Client", videos: Iterable[str | os.PathLike], prompt: str | None = None, *,
                 concurrency: int, retries: int, skip: Callable[[str, str | None], bool] | None = None,
                 wait_down_s: float = DEFAULT_WAIT_DOWN_S, max_failures_in_a_row: int | None = None,
                 **kwargs) -> Iterator[VideoResult]:
    """:meth:`Client.caption_many`: ``concurrency`` worker threads share one channel, each
    reading a file, hashing it, and captioning it with retries; results come out in the order
    they finish. Closing the generator stops the workers and cancels their calls.

    A decoder that is down or full (UNAVAILABLE, RESOURCE_EXHAUSTED) is waited for, each
    call tried again with backoff up to 10 s, for ``wait_down_s``; past it the run stops with
    :class:`CollectionStopped`, as it does after ``max_failures_in_a_row`` videos failed in
    a row for reasons not their own (None: twice ``concurrency``, at least 8; 0: never)."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    if retries < 0:
        raise ValueError(f"retries cannot be negative, got {retries}")
    if not wait_down_s >= 0:
        raise ValueError(f"wait_down_s cannot be negative, got {wait_down_s}")
    if max_failures_in_a_row is None:
        max_failures_in_a_row = max(8, 2 * concurrency)
    if max_failures_in_a_row < 0:
        raise ValueError(f"max_failures_in_a_row cannot be negative, got {max_failures_in_a_row}")
    pending = iter(videos)
    take = threading.Lock()
    results: queue.Queue = queue.Queue()
    calls = _Calls(client.address, wait_down_s)
    settings = request_settings(prompt, kwargs)
    done = object()

    def work(slot: int) -> None:
        try:
            while not calls.stopped.is_set():
                with take:
                    try:
                        path = next(pending, None)
                    except Exception as exc:  # the caller's own iterator failed: the caller's to see
                        results.put(_InputFailed(exc))
                        calls.stop()
                        return
                if path is None:
                    return
                path = os.fspath(path)
                try:
                    item = _caption_one(client, path, prompt, kwargs, retries, skip, calls, slot, settings)
                except Exception as exc:  # a bug here must not lose the video silently
                    item = VideoResult(path, "error", code="CLIENT_ERROR", message=f"{type(exc).__name__}: {exc}",
                                       settings=settings)
                if item is not None:
                    results.put(item)
        finally:
            results.put(done)

    workers = [threading.Thread(target=work, args=(i,), name=f"caption-{i}", daemon=True)
               for i in range(concurrency)]
    for w in workers:
        w.start()
    running = len(workers)
    failures_in_a_row = 0
    try:
        while running:
            try:
                item = results.get(timeout=0.2)  # a timeout keeps Ctrl-C prompt
            except queue.Empty:
                continue
            if item is done:
                running -= 1
                continue
            if isinstance(item, _InputFailed):
                raise item.error
            if item.status == "ok":
                failures_in_a_row = 0
            elif item.status == "error" and item.code not in VIDEO_FAULTS:
                failures_in_a_row += 1
                if max_failures_in_a_row and failures_in_a_row >= max_failures_in_a_row:
                    calls.abort(f"the last {failures_in_a_row} videos failed one after the other, the last with "
                                f"{item.code}: {item.message}; that is the service's trouble, not the videos'")
            yield item
        if calls.reason is not None:
            raise CollectionStopped(calls.reason)
    finally:
        calls.stop()
        deadline = time.monotonic() + 10
        for w in workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))


@dataclass
class _InputFailed:
    error: Exception


class _Calls:
    """The calls of a :func:`caption_many` run in progress, one per worker slot. Once
    :meth:`stop` has cancelled them, no call starts: a worker still reading its file then
    makes none. :meth:`abort` stops the run for a reason the caller is told."""

    def __init__(self, address: str = "", wait_down_s: float = DEFAULT_WAIT_DOWN_S):
        self.address = address
        self.wait_down_s = wait_down_s
        self.stopped = threading.Event()
        self.reason: str | None = None
        self._streams: dict[int, CaptionStream] = {}
        self._lock = threading.Lock()

    def add(self, slot: int, stream: CaptionStream) -> bool:
        """Keep ``stream`` to cancel on :meth:`stop`; False (and the stream closed) when
        stopped already."""
        with self._lock:
            if not self.stopped.is_set():
                self._streams[slot] = stream
                return True
        stream.close()
        return False

    def remove(self, slot: int) -> None:
        with self._lock:
            self._streams.pop(slot, None)

    def abort(self, reason: str) -> None:
        with self._lock:
            if self.reason is None and not self.stopped.is_set():
                self.reason = reason
        self.stop()

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()
            streams = list(self._streams.values())
        for stream in streams:
            stream.close()


def _read_and_hash(path: str, limit: int) -> tuple[int, str, bytes | None]:
    """(size, sha256, bytes) of the file; bytes None when it is larger than ``limit`` (it is
    hashed piece by piece instead of being held: no request could carry it)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= limit:
            data = f.read()
            if len(data) <= limit:
                return len(data), hashlib.sha256(data).hexdigest(), data
            digest, size = hashlib.sha256(data), len(data)
            del data
        else:
            digest, size = hashlib.sha256(), 0
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
            size += len(piece)
        return size, digest.hexdigest(), None


def _caption_one(client: "Client", path: str, prompt: str | None, kwargs: dict, retries: int,
                 skip: Callable[[str, str | None], bool] | None, calls: _Calls, slot: int,
                 settings: dict | None = None) -> VideoResult | None:
    """Caption one file, retrying what is worth it; None if stopped from outside."""
    start = time.monotonic()
    try:
        size, digest, data = _read_and_hash(path, client.max_video_bytes)
    except OSError as exc:
        if skip is not None and skip(path, None):  # recorded unreadable before (--no-retry-failed)
            return VideoResult(path, "skipped", prompt=prompt, settings=settings)
        return VideoResult(path, "error", code=FILE_ERROR, prompt=prompt, settings=settings,
                           message=f"cannot read {path}: {exc.strerror or exc}")
    if skip is not None and skip(path, digest):
        return VideoResult(path, "skipped", size=size, sha256=digest, prompt=prompt, settings=settings)

    def failed(code: str, message: str) -> VideoResult:
        return VideoResult(path, "error", size=size, sha256=digest, code=code, message=message,
                           attempts=attempt, prompt=prompt, elapsed_s=time.monotonic() - start, settings=settings)

    attempt = counted = 0
    if data is None:
        return failed(FILE_ERROR, too_large_message("the video is", size, client.max_video_bytes))
    down_since: float | None = None  # when the service's trouble began, for this video
    # a request carries UTF-8 text only: a name that is not UTF-8 travels with its odd bytes replaced
    name = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    while True:
        attempt += 1
        if calls.stopped.is_set():
            return None
        try:
            stream = client.caption(data, prompt, video_name=name, **kwargs)
        except ValueError as exc:  # larger than one request may carry
            return failed(FILE_ERROR, str(exc))
        if not calls.add(slot, stream):
            return None
        try:
            for _ in stream:
                pass
            if stream.result is None:  # closed between two pieces by stop(): it ended without its result
                return None
            return VideoResult(path, "ok", size=size, sha256=digest, result=stream.result, attempts=attempt,
                               prompt=prompt, elapsed_s=time.monotonic() - start, settings=settings)
        except CaptionError as err:
            if calls.stopped.is_set():
                return None
            if err.status in SERVICE_DOWN:
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if now - down_since >= calls.wait_down_s:
                    calls.abort(f"the decoder at {calls.address} answered {err.status.name} for "
                                f"{now - down_since:.0f} s (wait_down_s {calls.wait_down_s:g}): {err.message}")
                    return None
                backoff_step = attempt - counted  # the service's trouble backs off on its own count
            else:
                down_since = None
                counted += 1
                if err.status not in RETRYABLE or counted > retries:
                    return failed(err.status.name, err.message)
                backoff_step = counted
        finally:
            calls.remove(slot)
            stream.close()
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (backoff_step - 1)) * random.uniform(0.5, 1.0)
        if calls.stopped.wait(backoff):
            return None
