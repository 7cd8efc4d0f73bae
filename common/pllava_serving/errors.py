"""The one place that turns exceptions into gRPC status codes.

Servicers and engines raise ordinary exceptions; :class:`ErrorInterceptor` wraps every RPC
handler of a server and answers with:

==========================================================  =====================
exception                                                   status
==========================================================  =====================
``ValueError`` (``pllava.video.VideoError``,                ``INVALID_ARGUMENT``
``pllava.generation.ContextOverflowError``, bad settings
of one request, malformed tensors)
:class:`Overloaded` (queue full)                            ``RESOURCE_EXHAUSTED``
:class:`Unavailable` (loading, shutting down)               ``UNAVAILABLE``
``TimeoutError`` (a deadline ran out while waiting)         ``DEADLINE_EXCEEDED``
``grpc.aio.AioRpcError`` from a call to another server      that call's status
:class:`InternalError` (a failure the server can name)      ``INTERNAL``
anything else                                               ``INTERNAL``
==========================================================  =====================

The message of the first five is the exception's own text, written for a person (``cooking.mp4:
the file is truncated ...``), cut to :data:`MAX_MESSAGE_CHARS` (a status message travels in
the trailing metadata, whose size gRPC limits); :class:`InternalError` adds the request id. Anything else logs
the traceback and tells the caller only that an internal error happened and the request id
to look for in the server log.

Why an interceptor and not a decorator: ``grpc.aio`` interceptors see the handler itself, so
one wrapper covers unary and streaming methods of every service (ours, health, reflection)
and a servicer cannot forget it. A handler that already aborted (``context.abort``) or was
cancelled by its client passes through untouched.

Every RPC also gets a request id: the request's ``request_id`` field when it has one (one
that is not 1-128 printable ASCII characters without spaces is refused with
INVALID_ARGUMENT: it travels in gRPC metadata and log lines), else the ``x-request-id``
metadata the caller sent (the decoder sends its id to the encoder both ways, so one caption
has one id in both servers' logs; an unusable value is ignored), else a fresh one.
:func:`current_request_id` returns it anywhere inside the handler (logging adds it to every
line, see :mod:`pllava_serving.logs`), and the caller receives it in the ``request-id``
trailing metadata of every RPC.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
import uuid
from typing import Any, AsyncContextManager, Callable

import grpc

log = logging.getLogger(__name__)

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("pllava_request_id", default="")


class Overloaded(Exception):
    """The server's queue is full: try again later or elsewhere (RESOURCE_EXHAUSTED)."""


class Unavailable(Exception):
    """The server cannot take the request now: still loading or shutting down (UNAVAILABLE).
    Clients and the decoder's retry policy treat this as "try another replica"."""

    #: False when an immediate retry cannot help (the server already waited for what was
    #: missing): the answer then carries gRPC's ``grpc-retry-pushback-ms`` = -1, which tells
    #: a client's retry policy not to retry.
    retry: bool = True


#: The metadata key a caller may set to name its request (and the decoder sets on Encode).
REQUEST_ID_METADATA = "x-request-id"
#: A request id is at most this long and printable ASCII without spaces, so it cannot break
#: a log line or the metadata it travels in.
MAX_REQUEST_ID_CHARS = 128
#: A status message is cut to this many characters (it may quote what the caller sent).
MAX_MESSAGE_CHARS = 2000
#: A name the caller gave (``video_name``) is shortened to this many characters in messages.
MAX_NAME_CHARS = 200


class InternalError(Exception):
    """The server failed on this request in a way it can describe (INTERNAL, with this
    message and the request id): e.g. one sequence's sampling failed in the decoding engine.
    Its message must not leak anything the caller should not see."""


def usable_request_id(value: object) -> bool:
    """Whether ``value`` may serve as a request id (see :data:`MAX_REQUEST_ID_CHARS`)."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_CHARS and value.isascii()
            and value.isprintable() and " " not in value)


def display_name(name: str) -> str:
    """A caller-given name fit for a message or a log line: characters that are not printable
    escaped, and the middle of a long one left out."""
    if not name.isprintable():
        name = name.encode("unicode_escape").decode("ascii")
    if len(name) > MAX_NAME_CHARS:
        keep = MAX_NAME_CHARS - 40
        name = f"{name[:keep]}...{name[-37:]}"
    return name


def _cut(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS - 40] + f" ... ({len(message)} characters in all)"


def current_request_id() -> str:
    """The id of the RPC being handled ("" outside one)."""
    return _request_id.get()


def use_request_id(request_id: str) -> None:
    """Make ``request_id`` the current task's (for servers that do not go through the
    interceptors, such as the HTTP front end): its log lines carry it from now on."""
    _request_id.set(request_id)


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message an exception becomes (see the module docstring)."""
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "the server is overloaded; retry later"
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "the server is not serving; retry later"
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "the deadline ran out"
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or type(exc).__name__
    rid = current_request_id()
    if isinstance(exc, InternalError):
        return grpc.StatusCode.INTERNAL, f"{exc} (request {rid}; the server log has the details)"
    return grpc.StatusCode.INTERNAL, (f"internal error while handling request {rid}; "
                                      "the server log has the details under that id")


async def _abort_with(exc: Exception, context, method: str) -> None:
    code, message = status_for(exc)
    message = _cut(message)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed with an internal error", method, exc_info=exc)
    else:  # a refusal (INFO), unless the exception says it is worth more (``log_level``)
        log.log(getattr(exc, "log_level", logging.INFO), "%s -> %s: %s", method, code.name, message)
    trailing = [("request-id", current_request_id())]
    if isinstance(exc, Unavailable) and not exc.retry:
        trailing.append(("grpc-retry-pushback-ms", "-1"))
    context.set_trailing_metadata(tuple(trailing))
    await context.abort(code, message)


#: A call cancelled this close to its deadline counts as DEADLINE_EXCEEDED: the client's own
#: deadline fires a little before the server's (the server starts its clock when the call
#: arrives), and the client then cancels the call.
DEADLINE_SLACK_S = 1.0


def ended_early(context, stopping: bool = False) -> grpc.StatusCode:
    """The status of an RPC whose handler did not finish: its deadline ran out, the server
    cut it at shutdown (``stopping``: the client was told UNAVAILABLE), or the client went
    away."""
    left = context.time_remaining()
    if left is not None and left <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.UNAVAILABLE if stopping else grpc.StatusCode.CANCELLED


_WHY_ENDED = {grpc.StatusCode.DEADLINE_EXCEEDED: "its deadline ran out",
              grpc.StatusCode.UNAVAILABLE: "the server cut it, shutting down past grace_s",
              grpc.StatusCode.CANCELLED: "the client went away"}


def _passes_through(exc: BaseException) -> bool:
    """Exceptions that are not errors of the handler: an abort it chose, a cancellation."""
    return isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError)) or not isinstance(exc, Exception)


Around = Callable[[Any, Any, str], AsyncContextManager[None]]


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour run inside ``around(request, context, method)``.

    ``request`` is the request message for unary-request methods and ``None`` for
    request-streaming ones. For response-streaming methods the context spans the whole
    stream. Synchronous handlers (our servers have none) are returned unchanged.
    """
    kind = next(k for k in ("unary_unary", "stream_unary", "unary_stream", "stream_stream")
                if getattr(handler, k))
    behavior = getattr(handler, kind)
    unary_request = kind.startswith("unary")
    if inspect.isasyncgenfunction(behavior):
        async def wrapper(request_or_iterator, context):
            async with around(request_or_iterator if unary_request else None, context, method):
                async for response in behavior(request_or_iterator, context):
                    yield response
    elif inspect.iscoroutinefunction(behavior):
        # Unary responses, and response streams written with ``context.write`` (health Watch).
        async def wrapper(request_or_iterator, context):
            async with around(request_or_iterator if unary_request else None, context, method):
                return await behavior(request_or_iterator, context)
    else:
        return handler
    return handler._replace(**{kind: wrapper})


def request_id_of(request, context) -> str:
    """The id an RPC is known by (see the module docstring); ValueError for a request whose
    ``request_id`` field is set but unusable."""
    rid = getattr(request, "request_id", "") if request is not None else ""
    if isinstance(rid, str) and rid:
        if not usable_request_id(rid):
            raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters "
                             f"without spaces; got {len(rid)} characters: {display_name(rid[:MAX_NAME_CHARS])!r}")
        return rid
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str):
            if usable_request_id(value):
                return value
            log.info("ignored an unusable %s metadata value (%d characters)", REQUEST_ID_METADATA, len(value))
    return new_request_id()


def _never() -> bool:
    return False


@contextlib.asynccontextmanager
async def _map_errors(request, context, method: str, stopping: Callable[[], bool] = _never):
    try:
        _request_id.set(request_id_of(request, context))
    except ValueError as exc:  # refused under an id of its own
        _request_id.set(new_request_id())
        context.set_trailing_metadata((("request-id", current_request_id()),))
        await _abort_with(exc, context, method)
    context.set_trailing_metadata((("request-id", current_request_id()),))
    start = time.monotonic()
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):  # one line under the request's id, whatever stage
        # it reached (a response stream grpc closes ends with GeneratorExit)
        code = ended_early(context, stopping())
        log.info("%s -> %s after %.1f s: %s", method, code.name, time.monotonic() - start, _WHY_ENDED[code])
        raise
    except BaseException as exc:
        if _passes_through(exc):
            raise
        await _abort_with(exc, context, method)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler so that exceptions become status codes (see the module docstring).
    ``stopping()`` True: the server is cutting the calls still running at shutdown."""

    def __init__(self, stopping: Callable[[], bool] = _never):
        self._stopping = stopping

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        around = functools.partial(_map_errors, stopping=self._stopping)
        return wrap_handler(handler, around, handler_call_details.method)
