"""The PLLaVA client: caption a video through the decoder server, streaming the text.

    from pllava_client import Client, frame_files

    with Client("localhost:50052") as client:
        stream = client.caption("video.mp4", "What happens?", max_new_tokens=64)
        for piece in stream:                  # text pieces, as tokens are generated
            print(piece, end="", flush=True)
        print(stream.result.finish_reason)    # the final event, once the stream has ended

        result = client.caption_full(open("video.mp4", "rb"))    # everything in one object
        result = client.caption_full(frames=frame_files("clip_frames/"))   # frames you sampled

A video is a path, the file's bytes, or a binary file object. The video bytes go to the
decoder, which fetches the visual tokens from an encoder replica itself: the client needs one
address and never sees a tensor. Callers that decoded the video themselves send the frames
they sampled instead, ``frames=[...]``: JPEG, PNG or WebP images (paths, bytes or binary
files), first frame first (see :mod:`pllava_client.frames` and ``Frames`` in the proto).

A failed call raises :class:`CaptionError` (a ``grpc.RpcError``) carrying the status code and
the server's message, for example ``INVALID_ARGUMENT: cannot decode the video ...``.
Closing a stream -- ``stream.close()``, leaving a ``with`` block, or dropping the last
reference, as a ``for`` loop over ``client.caption(...)`` that breaks does -- cancels the call,
and the decoder frees the request's slot at once.

Imports only grpcio, protobuf and numpy (through the stubs), never MindSpore.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator, Sequence, Union

import grpc
from google.protobuf.descriptor import FieldDescriptor

from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc

from .channel import (MAX_MESSAGE_BYTES, channel_options, grpc_target, server_count,
                      stays_on_this_machine, tls_server_name)
from .frames import Frame, read_frames
from .retry import CaptionRetry
from .security import BearerToken, ClientTls, check_token, explain_unavailable, secure_or_insecure_channel

if TYPE_CHECKING:
    from .collection import VideoResult

log = logging.getLogger("pllava_client")

#: What gRPC says of a TLS handshake that cannot succeed, however long one waits.
TLS_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "Hostname Verification")

#: Extra attempts :meth:`Client.caption_many` makes for a video whose call failed in passing.
DEFAULT_RETRIES = 3

Video = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

#: Room for the request's other fields next to the video inside one message.
_REQUEST_OVERHEAD_BYTES = 64 << 10
#: Upper bound of the framing of one image inside a Frames message (tag and length).
_FRAME_OVERHEAD_BYTES = 16


def too_large_message(what: str, size: int, limit: int) -> str:
    return f"{what} {size} bytes; one request carries at most {limit} bytes of video or frames"


class RequestTooLarge(ValueError):
    """The request would not fit in one gRPC message (the video, the frames or all its fields
    together): sending it again cannot help."""


#: A caption is not tried again with less of its deadline left than this, in seconds.
MIN_ATTEMPT_S = 1.0

#: What gRPC itself answers (RESOURCE_EXHAUSTED) to a call beyond a server's
#: ``maximum_concurrent_rpcs``.
GRPC_RPC_LIMIT_MESSAGE = "Concurrent RPC limit exceeded!"


class CaptionError(grpc.RpcError):
    """A call the server refused or that failed on the way.

    ``status`` is the ``grpc.StatusCode`` and ``message`` the server's explanation;
    ``str(error)`` is ``"STATUS_NAME: message"``. Like the errors grpcio raises, it also has
    ``code()`` and ``details()``, so ``except grpc.RpcError`` handlers keep working.
    """

    def __init__(self, status: grpc.StatusCode, message: str):
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError,
                       explain: Callable[[str], str] | None = None) -> "CaptionError":
        """``error`` as a CaptionError; ``explain`` rewrites the message of an UNAVAILABLE
        error (the client adds the likely TLS mismatch there)."""
        if isinstance(error, CaptionError):
            return error
        code = error.code() if callable(getattr(error, "code", None)) else None
        details = error.details() if callable(getattr(error, "details", None)) else None
        message = details or str(error)
        if code == grpc.StatusCode.UNAVAILABLE and explain is not None:
            message = explain(message)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and message == GRPC_RPC_LIMIT_MESSAGE:
            message += (" (the server holds the most calls it takes at once, its max_concurrent_rpcs; "
                        "retry shortly)")
        return cls(code or grpc.StatusCode.UNKNOWN, message)


@dataclass
class CaptionResult:
    """The final event of a caption stream.

    :meth:`to_json` gives the same keys as the in-process ``pllava caption --json``; the
    attributes after ``timings`` are what only the server knows.
    """

    caption: str = ""
    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_visual_tokens: int = 0
    num_frames: int = 0
    #: "stop", "length", "stop_string", "context_length" or "cancelled".
    finish_reason: str = ""
    #: Milliseconds (and decode_tokens_per_s): the in-process keys plus transfer_ms.
    timings: dict[str, float] = field(default_factory=dict)
    stop_string: str = ""
    visual_tokens_cached: bool = False
    model_id: str = ""
    request_id: str = ""
    #: leading prompt positions the decoder found in its KV cache rather than prefilled
    num_prompt_tokens_reused: int = 0

    def to_json(self) -> dict:
        """The object ``pllava-caption --json`` prints (the in-process command's keys)."""
        return dict(caption=self.caption, prompt=self.prompt,
                    prompt_token_ids=list(self.prompt_token_ids), token_ids=list(self.token_ids),
                    num_visual_tokens=self.num_visual_tokens, num_frames=self.num_frames,
                    finish_reason=self.finish_reason, timings=dict(self.timings))

    @classmethod
    def from_proto(cls, final: pllava_pb2.FinalEvent) -> "CaptionResult":
        reason = pllava_pb2.FinishReason.Name(final.finish_reason)
        timings = {f.name: getattr(final.timings, f.name)
                   for f in pllava_pb2.Timings.DESCRIPTOR.fields}
        return cls(caption=final.caption, prompt=final.prompt,
                   prompt_token_ids=list(final.prompt_token_ids), token_ids=list(final.token_ids),
                   num_visual_tokens=final.num_visual_tokens, num_frames=final.num_frames,
                   finish_reason=reason[len("FINISH_REASON_"):].lower(), timings=timings,
                   stop_string=final.stop_string, visual_tokens_cached=final.visual_tokens_cached,
                   model_id=final.model_id, request_id=final.request_id,
                   num_prompt_tokens_reused=final.num_prompt_tokens_reused)


class CaptionStream:
    """An iterator over the text pieces of one ``Decoder.Caption`` call.

    Pieces are yielded as the server generates them (empty pieces are skipped; their token
    ids still count). Once the iterator is exhausted, :attr:`result` holds the final event.
    :attr:`token_ids` and :attr:`text` grow as the stream goes. :meth:`close` (also on leaving
    a ``with`` block or on garbage collection) cancels the call if it is still running.

    ``again(timeout)``, when given, makes the call once more with that deadline (None: none)
    and ``retry`` says when: a call that fails before anything was received is made again
    (see :class:`~pllava_client.retry.CaptionRetry`); ``deadline`` (``time.monotonic()``) is
    the end of all attempts together.
    """

    def __init__(self, call, explain: Callable[[str], str] | None = None, *,
                 again: Callable[[float | None], object] | None = None,
                 retry: CaptionRetry | None = None, deadline: float | None = None):
        self._call = call  # grpc's response iterator, which is also the call object
        self._explain = explain
        self._again = again
        self._retry = retry if again is not None else None
        self._ends_at = deadline
        self._attempts = 1
        self._received = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.token_ids: list[int] = []
        self.text = ""
        self.result: CaptionResult | None = None
        self._done = False

    def __iter__(self) -> "CaptionStream":
        return self

    def __next__(self) -> str:
        while not self._done:
            try:
                event = next(self._call)
            except StopIteration:
                self._done = True
                if self.result is None:
                    raise CaptionError(grpc.StatusCode.UNKNOWN,
                                       "the server ended the caption stream without a final event"
                                       ) from None
                break
            except grpc.RpcError as err:
                if self._try_again(err):
                    continue
                self._done = True
                # Once the server has answered, the transport works: a break later on (the
                # decoder went away mid-stream) is no TLS question.
                raise CaptionError.from_rpc_error(err, None if self._received else self._explain) from None
            if not self._received:
                self._answered()
            kind = event.WhichOneof("event")
            if kind == "token":
                self.token_ids.extend(event.token.token_ids)
                if event.token.text:
                    self.text += event.token.text
                    return event.token.text
            elif kind == "final":
                self.result = CaptionResult.from_proto(event.final)
        raise StopIteration

    def _try_again(self, err: grpc.RpcError) -> bool:
        """Make the call again if ``err`` is worth it and time is left; True if made. A
        stream closed while it waits to try again raises CANCELLED."""
        if self._retry is None or self._received or self._closed.is_set():
            return False
        code = err.code() if callable(getattr(err, "code", None)) else None
        trailing = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
        pause = self._retry.pause_s(self._attempts, code, trailing)
        if pause is None:
            return False
        if self._ends_at is not None and self._ends_at - time.monotonic() - pause < MIN_ATTEMPT_S:
            return False  # the caller hears why the last attempt failed, not that time ran out
        self._closed.wait(pause)  # ends early on close()
        with self._lock:
            if self._closed.is_set():
                raise CaptionError(grpc.StatusCode.CANCELLED, "the caption was closed while it waited to try "
                                   "the decoder again") from None
            try:
                self._call = self._again(None if self._ends_at is None else self._ends_at - time.monotonic())
            except Exception as exc:  # noqa: BLE001 -- the client closed meanwhile, a token function failing
                self._done = True
                closed = isinstance(exc, ValueError) and "closed" in str(exc).lower()
                raise CaptionError(grpc.StatusCode.CANCELLED if closed else grpc.StatusCode.UNKNOWN,
                                   f"trying the decoder again failed: {exc}") from None
            self._attempts += 1
        return True

    def _answered(self) -> None:
        """The decoder answered: the call is never made again, so what it takes to make it
        (the request, which holds the video) is let go."""
        self._received = True
        self._again = self._retry = None

    def close(self) -> None:
        """Cancel the call if it has not finished; harmless otherwise."""
        with self._lock:
            self._closed.set()
            if self._done:
                return
            self._done = True
            call = self._call
        call.cancel()

    cancel = close

    def __enter__(self) -> "CaptionStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the channel may be gone already
            pass


def read_video(video: Video) -> tuple[bytes, str]:
    """``(bytes, name)`` of a video given as a path, bytes or a binary file object."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        return bytes(video), ""
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        with open(path, "rb") as f:
            return f.read(), os.path.basename(path)
    read = getattr(video, "read", None)
    if callable(read):
        data = read()
        if isinstance(data, str):
            raise TypeError("the video file object is open in text mode; open it with 'rb'")
        name = getattr(video, "name", "")
        return bytes(data), os.path.basename(name) if isinstance(name, str) else ""
    raise TypeError(f"a video is a path, bytes or a binary file object, not {type(video).__name__}")


def caption_request(video: bytes | None = None, *, frames: Sequence[bytes] | None = None,
                    prompt: str | None = None, template: str | None = None,
                    num_frames: int = 0, max_new_tokens: int = 0, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None,
                    repetition_penalty: float | None = None, seed: int | None = None,
                    stop: Sequence[str] = (), request_id: str = "", video_name: str = "") -> pllava_pb2.CaptionRequest:
    """The ``CaptionRequest`` for these arguments: a ``video`` file's bytes or ``frames``
    (encoded images), or neither to check the other arguments alone; ``None`` leaves a
    sampling field unset (the server's default). Raises ValueError naming the argument a
    field cannot hold, e.g. ``top_k must be an integer from 0 to 4294967295, got -3``."""
    request = pllava_pb2.CaptionRequest()
    if frames is not None:
        request.frames.images.extend(frames)
    elif video is not None:
        _set_field(request, "video", video)
    for field, value in (("prompt", prompt or ""), ("template", template or ""), ("num_frames", num_frames),
                         ("request_id", request_id), ("video_name", video_name)):
        _set_field(request, field, value)
    for field, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                         ("top_k", top_k), ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            _set_field(request.sampling, field, value)
    if isinstance(stop, str):
        raise ValueError(f"stop must be a list of strings, got the string {stop!r}")
    for i, text in enumerate(stop):
        if not isinstance(text, str):
            raise ValueError(f"stop[{i}] must be a string, got {text!r}")
        request.sampling.stop.append(text)
    return request


#: Words for what a field of each protobuf type holds, for error messages.
_FIELD_KINDS = {
    FieldDescriptor.CPPTYPE_UINT32: "an integer from 0 to 4294967295",
    FieldDescriptor.CPPTYPE_UINT64: "an integer from 0 to 18446744073709551615",
    FieldDescriptor.CPPTYPE_INT32: "an integer from -2147483648 to 2147483647",
    FieldDescriptor.CPPTYPE_INT64: "an integer from -9223372036854775808 to 9223372036854775807",
    FieldDescriptor.CPPTYPE_FLOAT: "a number", FieldDescriptor.CPPTYPE_DOUBLE: "a number",
    FieldDescriptor.CPPTYPE_STRING: "a string", FieldDescriptor.CPPTYPE_BOOL: "true or false",
}


def _set_field(message, field: str, value) -> None:
    """``message.field = value``, or a ValueError that names the field (protobuf's own says
    only ``Value out of range: -3``)."""
    try:
        setattr(message, field, value)
    except (ValueError, TypeError):
        descriptor = message.DESCRIPTOR.fields_by_name[field]
        kind = _FIELD_KINDS.get(descriptor.cpp_type, f"a {descriptor.type} value")
        if descriptor.type == FieldDescriptor.TYPE_BYTES:
            kind = "bytes"
        raise ValueError(f"{field} must be {kind}, got {value!r}") from None
    if message.DESCRIPTOR.fields_by_name[field].cpp_type == FieldDescriptor.CPPTYPE_FLOAT:
        held = getattr(message, field)  # a 32-bit float: 1e39 would arrive as inf, 1e-46 as 0
        if math.isfinite(value) and (math.isinf(held) or (held == 0) != (value == 0)):
            raise ValueError(f"{field} must be a number a 32-bit float holds: 0, or about 1e-45 "
                             f"to 3e38 in size; got {value!r}")


class Client:
    """A connection to a PLLaVA decoder server (the one address a client needs).

    ``timeout`` is the default deadline in seconds of every call (``None``: no deadline);
    each method takes its own ``timeout`` too. ``options`` replaces the gRPC channel options
    (default: :func:`pllava_client.channel.channel_options` with round robin and 64 MiB
    messages).

    A caption that fails with UNAVAILABLE before its first token (the decoder is loading, shutting
    down or restarting, was killed or was not reachable) is made again by the client, up to 5
    attempts within 3 s and within the call's deadline (:class:`~pllava_client.retry.CaptionRetry`),
    unless the decoder's answer says another try cannot help or when to try
    (``grpc-retry-pushback-ms``); once tokens have streamed, a
    failure is the caller's to see. ``retry_unavailable=False`` leaves that out (a caller that
    retries itself, as :meth:`caption_many` does). The channel
    reconnects within 2 s of losing its decoder, so a client made before a decoder restart
    works after it.

    ``address`` may name several decoders: ``dns:///decoders:50052`` (every address the name
    resolves to) or a comma list ``host:50052,host:50053``; calls are balanced round robin
    over the decoders that are up.

    TLS: ``tls_ca`` (a PEM file, the CA that signed the decoder's certificate) connects over
    TLS, checking the certificate against the address's host; ``tls_cert`` and ``tls_key``
    add a client certificate for decoders that require one (mutual TLS). ``token`` is sent as
    ``authorization: Bearer TOKEN`` with every call (a function is asked for it each time). A
    connection that fails because the transport does not match the decoder's (it wants TLS, a
    client certificate, another CA)
    raises UNAVAILABLE with the likely cause in the message. ValueError for files that cannot
    be read or options that do not go together.
    """

    def __init__(self, address: str, *, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, token: str | Callable[[], str] | None = None,
                 timeout: float | None = None,
                 options: Sequence[tuple[str, object]] | None = None, retry_unavailable: bool = True):
        self.address = address
        self.timeout = timeout
        if options is not None:
            self._options = list(options)
        else:  # without the client's retry, none of gRPC's either (as before it had its own)
            self._options = channel_options(round_robin=True) + ([] if retry_unavailable else
                                                                 [("grpc.enable_retries", 0)])
        self._retry = CaptionRetry() if retry_unavailable else None
        self._streams: weakref.WeakSet[CaptionStream] = weakref.WeakSet()  # closed with the client
        self._streams_lock = threading.Lock()
        self._max_message = dict(self._options).get("grpc.max_send_message_length",
                                                     MAX_MESSAGE_BYTES)
        self._tls = ClientTls.from_files(tls_ca, tls_cert, tls_key)
        if self._tls is not None:
            name = tls_server_name(address)
            if name and "grpc.ssl_target_name_override" not in dict(self._options):
                self._options.append(("grpc.ssl_target_name_override", name))
        interceptor = (BearerToken(token if callable(token) else check_token(token, "token"))
                       if token is not None else None)
        if interceptor is not None and self._tls is None and not stays_on_this_machine(address):
            log.warning("the token goes to %s in plaintext, readable on the way; connect over TLS (tls_ca, "
                        "--tls-ca)", address)
        self._channel = secure_or_insecure_channel(grpc_target(address), self._tls, self._options)
        self._calls = grpc.intercept_channel(self._channel, interceptor) if interceptor else self._channel
        self._stub = pllava_pb2_grpc.DecoderStub(self._calls)

    @property
    def max_video_bytes(self) -> int:
        """The largest video (or frames together) one request carries on this channel."""
        return self._max_message - _REQUEST_OVERHEAD_BYTES

    def _explain(self, details: str) -> str:
        return explain_unavailable(details, self._tls, server=f"the decoder at {self.address}")

    def caption(self, video: Video | None = None, prompt: str | None = None, *,
                frames: Iterable[Frame] | None = None, template: str | None = None,
                num_frames: int = 0, max_new_tokens: int = 0, temperature: float | None = None,
                top_p: float | None = None, top_k: int | None = None,
                repetition_penalty: float | None = None, seed: int | None = None,
                stop: Sequence[str] = (), request_id: str = "", video_name: str | None = None,
                timeout: float | None | object = ...) -> CaptionStream:
        """Start captioning ``video``, or the ``frames`` you sampled from one; return the
        stream of text pieces.

        Give exactly one of ``video`` and ``frames`` (a list of JPEG, PNG or WebP images as
        paths, bytes or binary files, first frame first, all of one size; the encoder uses
        every one and repeats them if the model takes more frames, see ``Frames`` in the
        proto). ``prompt`` None/empty, ``template`` None, ``num_frames`` 0 and
        ``max_new_tokens`` 0 take the server's defaults; sampling parameters left at None too
        (greedy decoding). ``video_name`` (default: the file's name, or the frames' folder)
        only labels the video in the server's logs and messages. ``timeout=...`` means the
        client's default deadline. Raises TypeError for both or neither of ``video`` and
        ``frames``, ValueError for an empty frame list, a request larger than the channel's
        message limit or an argument the request cannot carry (a negative ``top_k``, ...; the
        message names it; :class:`RequestTooLarge`, a ValueError, for one too large), and OSError
        for a path that cannot be read; the server's refusals
        (:class:`CaptionError`) surface while iterating.
        """
        if (video is None) == (frames is None):
            raise TypeError("caption() takes either a video or frames=[images...], "
                            + ("not both" if video is not None else "and got neither"))
        if frames is not None:
            images, name = read_frames(frames)
            size = sum(len(image) + _FRAME_OVERHEAD_BYTES for image in images)
            content = dict(frames=images)
            what = f"the {len(images)} frames are"
        else:
            data, name = read_video(video)
            size, content, what = len(data), dict(video=data), "the video is"
        if size > self.max_video_bytes:
            raise RequestTooLarge(too_large_message(what, size, self.max_video_bytes))
        request = caption_request(
            prompt=prompt, template=template, num_frames=num_frames, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
            seed=seed, stop=stop, request_id=request_id, video_name=name if video_name is None else video_name,
            **content)
        if request.ByteSize() > self._max_message:  # a long prompt or stop strings beside the video
            raise RequestTooLarge(f"the request is {request.ByteSize()} bytes with its prompt and other fields "
                                  f"({what} {size}); one request carries at most {self._max_message}")
        timeout = self._deadline(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout

        def again(left: float | None):
            return self._stub.Caption(request, timeout=left)

        stream = CaptionStream(again(timeout), self._explain, again=again, retry=self._retry, deadline=deadline)
        with self._streams_lock:
            self._streams.add(stream)
        return stream

    def caption_full(self, video: Video | None = None, prompt: str | None = None, **kwargs) -> CaptionResult:
        """Caption ``video`` (or ``frames=[...]``) and return the whole result (same arguments
        as :meth:`caption`)."""
        with self.caption(video, prompt, **kwargs) as stream:
            for _ in stream:
                pass
        return stream.result

    def caption_many(self, videos: Iterable[Union[str, "os.PathLike[str]"]], prompt: str | None = None, *,
                     concurrency: int | None = None, retries: int = DEFAULT_RETRIES,
                     skip: Callable[[str, str | None], bool] | None = None,
                     wait_down_s: float = 300.0, max_failures_in_a_row: int | None = None,
                     **kwargs) -> Iterator[VideoResult]:
        """Caption every video file in ``videos``, ``concurrency`` at a time, and yield a
        :class:`~pllava_client.collection.VideoResult` for each as it finishes.

        ``concurrency`` None: the decoder's batch size (``info().max_batch``) times the number
        of decoders the address names. A call that fails with a status worth another try
        (a decoder that went away mid-stream, INTERNAL, DEADLINE_EXCEEDED, ...) is retried
        up to ``retries`` times with backoff, on whichever decoder is up; other refusals
        (INVALID_ARGUMENT: not a video) and unreadable files give a result with status
        ``"error"``, and the run goes on. A decoder that is down or full (UNAVAILABLE,
        RESOURCE_EXHAUSTED) is waited for instead, calls tried again with backoff, up to
        ``wait_down_s`` seconds; past it, or after ``max_failures_in_a_row`` videos failed in a
        row for reasons not their own (None: twice ``concurrency``, at least 8; 0: never), the
        run stops: the iterator raises
        :class:`~pllava_client.collection.CollectionStopped` once the results already
        finished are out. ``skip(path, sha256)`` True yields a result with
        status ``"skipped"`` without calling the server (how ``pllava-caption --out`` resumes;
        ``skip(path, None)`` asks about a file that cannot be read). An exception raised by
        ``videos`` itself (a listing that fails midway) stops the run and is raised here.
        Make the client with ``retry_unavailable=False`` for it (``pllava-caption --out`` does).
        Other keyword arguments are :meth:`caption`'s; one a request cannot carry raises
        ValueError here, before any video is read. Closing the iterator cancels the calls in
        progress.
        """
        from .collection import caption_many

        if isinstance(videos, (str, bytes, os.PathLike)):
            raise TypeError(f"caption_many() takes a list of video paths, got {type(videos).__name__} "
                            f"{os.fsdecode(videos)!r}; for one video use caption() or pass [path]")
        if "video_name" in kwargs:
            raise TypeError("caption_many() names each video by its path; it takes no video_name")
        caption_request(prompt=prompt, **{k: v for k, v in kwargs.items() if k != "timeout"})
        if concurrency is None:
            concurrency = self.default_concurrency()
        return caption_many(self, videos, prompt, concurrency=concurrency, retries=retries, skip=skip,
                            wait_down_s=wait_down_s, max_failures_in_a_row=max_failures_in_a_row, **kwargs)

    def default_concurrency(self, info: pllava_pb2.ModelInfo | None = None) -> int:
        """Streams that keep every decoder's batch full: the batch size the decoder reports
        (in ``info``, or asked now) times the number of decoders the address names (1 if
        that cannot be known)."""
        info = self.info() if info is None else info
        return max(1, info.max_batch) * (server_count(self.address) or 1)

    def info(self, *, timeout: float | None | object = ...) -> pllava_pb2.ModelInfo:
        """The decoder's model and settings (``pllava_pb2.ModelInfo``)."""
        try:
            return self._stub.GetInfo(pllava_pb2.GetInfoRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise CaptionError.from_rpc_error(err, self._explain) from None

    def wait_ready(self, timeout: float) -> pllava_pb2.ModelInfo:
        """:meth:`info` from the first decoder that answers: while the answer is UNAVAILABLE
        (a decoder still loading or restarting, or not listening yet; with several, the one
        asked may be such) it is asked again, 0.5 s apart at first, up to 2 s, until
        ``timeout`` seconds have passed; then that error is raised. A TLS handshake that
        cannot succeed (a server certificate of another CA or for another name, a port that
        does not speak TLS) is no wait's matter: three such answers in a row raise. (A closed
        socket is waited out: docker-proxy and port-forwards close connections to a server
        not yet listening the way a TLS server closes a plaintext client's.)"""
        end = time.monotonic() + timeout
        pause = 0.5
        mismatches = 0
        while True:
            try:
                return self.info(timeout=max(0.1, end - time.monotonic()))
            except CaptionError as err:
                left = end - time.monotonic()
                if err.status != grpc.StatusCode.UNAVAILABLE or left <= 0:
                    raise
                mismatches = mismatches + 1 if any(sign in err.message for sign in TLS_FAILURES) else 0
                if mismatches >= 3:
                    raise
            time.sleep(min(pause, left))
            pause = min(2 * pause, 2.0)

    def close(self) -> None:
        """Close the channel: calls still running are cancelled, and so are captions waiting to
        try the decoder again."""
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _deadline(self, timeout) -> float | None:
        return self.timeout if timeout is ... else timeout
