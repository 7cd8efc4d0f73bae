"""The FastAPI application: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

Each completion is one ``Decoder.Caption`` call through :class:`pllava_client.Client`::

    body -> ChatRequest (400) -> model check (404) -> media bytes (400/413) -> a free place
    (429 beyond max_concurrent_requests) -> Caption -> the first piece of text, raced against
    the HTTP client leaving -> one JSON answer, or server-sent events piece by piece

Waiting for the first piece before answering lets the decoder's refusals (a bad video, a full
queue, a model still loading) become HTTP statuses rather than errors inside a 200 stream.
A client that leaves at any point cancels the gRPC call, and the decoder frees its KV slot.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pllava_client import CaptionError, Client, RequestTooLarge
from pllava_client.security import ClientTls
from pllava_serving.errors import display_name, use_request_id
from pllava_serving.security import TokenChecker, TokenFile

from . import responses as R
from .api_errors import ApiError, from_grpc
from .bridge import AsyncCaption, ClientGone, unless_disconnected
from .chat_request import ChatRequest, parse_chat_request
from .media import Media, MediaLoader
from .settings import OpenAISettings

log = logging.getLogger("pllava_openai")

#: Room for the JSON around the base64 media in a request body.
_BODY_OVERHEAD_BYTES = 1 << 20
#: Deadline of the GetInfo calls behind /health and the model id.
_INFO_TIMEOUT_S = 10.0
#: Request bodies up to this size are parsed on the event loop; larger ones in a thread.
_PARSE_ON_LOOP_BYTES = 64 << 10
_CALLER_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
#: What a request whose client left is answered with (nobody reads it; nginx's word for it).
_CLIENT_CLOSED = 499


class Slot:
    """One of the ``max_concurrent_requests`` places, and the request body bytes it holds of
    ``max_body_bytes_in_flight``; :meth:`release` (gives both back) may be called twice."""

    def __init__(self, front: "FrontEnd"):
        self._front = front
        self.body_bytes = 0
        self._released = False

    def take_body_bytes(self, count: int) -> None:
        """Count ``count`` more bytes of this request's body; ApiError 429 when they do not fit."""
        self._front.take_body_bytes(count, held_here=self.body_bytes)
        self.body_bytes += count

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._front.leave(self.body_bytes)


class FrontEnd:
    """What the routes share: the decoder client and its worker threads, the media loader,
    the accepted tokens, the model id and the count of captions in flight."""

    def __init__(self, settings: OpenAISettings):
        self.settings = settings
        # Both token files are read again when they change, as the gRPC servers read theirs:
        # one rotation of a shared token file (``pllava up --secure``) serves every hop.
        self.tokens = TokenChecker(TokenFile(settings.auth_token_file)) if settings.auth_token_file else None
        # Checked with the settings' names first, so a message names the setting to fix.
        ClientTls.from_files(settings.decoder_tls_ca, settings.decoder_tls_cert, settings.decoder_tls_key,
                             names=("decoder_tls_ca", "decoder_tls_cert", "decoder_tls_key"))
        self.client = Client(settings.decoder, timeout=settings.caption_timeout_s,
                             tls_ca=settings.decoder_tls_ca, tls_cert=settings.decoder_tls_cert,
                             tls_key=settings.decoder_tls_key,
                             token=(TokenFile(settings.decoder_token_file, "decoder_token_file").first
                                    if settings.decoder_token_file else None))
        # A caption's blocking work (parsing a large body, reading or downloading its media,
        # sending the request, waiting for pieces) runs here, one thread per admitted caption
        # at a time, never on the default pool that /health's decoder check runs on: slow
        # downloads used to fill that pool and stall /health (and a liveness probe) behind them.
        self.executor = ThreadPoolExecutor(settings.max_concurrent_requests, thread_name_prefix="caption")
        self.media = MediaLoader(settings, self.executor)
        self.max_body_bytes = settings.max_media_bytes * 4 // 3 + _BODY_OVERHEAD_BYTES
        self.started = int(time.time())
        self.model_id = settings.model_name
        self._in_flight = 0
        self._body_bytes = 0  # of the bodies of the captions in flight
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()  # cancels calls still running, which frees the worker threads
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- checks --------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.tokens is not None and not _bearer_allowed(self.tokens, request.headers.get("authorization")):
            given = "a wrong" if request.headers.get("authorization") else "no"
            raise ApiError(401, f"this server needs an API key: {given} 'Authorization: Bearer <token>' "
                                "header was sent", code="invalid_api_key")

    async def decoder_info(self):
        """The decoder's ModelInfo; :class:`ApiError` (503 while it loads or is unreachable)."""
        try:
            return await asyncio.to_thread(self.client.info, timeout=_INFO_TIMEOUT_S)
        except CaptionError as err:
            raise from_grpc(err.status, err.message) from None

    async def model_name(self) -> str:
        """The model id clients name: the setting, else the decoder's (asked once; /health
        refreshes it)."""
        if self.model_id is None:
            self.model_id = (await self.decoder_info()).model_id
        return self.model_id

    def admit(self) -> Slot:
        with self._lock:
            if self._in_flight >= self.settings.max_concurrent_requests:
                raise ApiError(429, f"{self._in_flight} captions are in flight, the most this server takes "
                                    "(max_concurrent_requests); retry shortly", code="resource_exhausted")
            self._in_flight += 1
        return Slot(self)

    def take_body_bytes(self, count: int, held_here: int = 0) -> None:
        """Body bytes are held from the moment they are expected (Content-Length) until the
        caption ends: a body's copies (text, JSON, decoded media, the gRPC request) cost
        several times its size. A lone request (nothing held but its own ``held_here``) is
        let in whatever its size (up to the 413 limit), so the budget never refuses a body
        that could come alone."""
        with self._lock:
            held = self._body_bytes
            limit = self.settings.max_body_bytes_in_flight
            if held > held_here and held + count > limit:
                raise ApiError(429, f"request bodies of {held} bytes are in flight here and this one needs {count} "
                                    f"more, past max_body_bytes_in_flight ({limit}); retry shortly",
                               code="resource_exhausted")
            self._body_bytes = held + count

    def leave(self, body_bytes: int) -> None:
        with self._lock:
            self._in_flight -= 1
            self._body_bytes -= body_bytes

    # ---- captions ------------------------------------------------------------------------------
    def start_caption(self, chat: ChatRequest, media: Media, request_id: str) -> AsyncCaption:
        """The caption call (building and sending a request of many megabytes: run it off the
        event loop)."""
        try:
            stream = self.client.caption(media.data, video_name=media.name, request_id=request_id,
                                         **chat.caption_kwargs())
        except RequestTooLarge as exc:  # larger than one gRPC message
            raise ApiError(413, str(exc), param="messages[0].content") from None
        except ValueError as exc:  # a field the request cannot carry (text that is not valid Unicode, ...)
            raise ApiError(400, str(exc)) from None
        return AsyncCaption(stream, self.executor)


def create_app(settings: OpenAISettings) -> FastAPI:
    """The application for ``settings``; the decoder client lives as long as the app runs."""
    front = FrontEnd(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        front.close()

    app = FastAPI(title="PLLaVA OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.front = front

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        request_id = _logged_id(request)
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        else:
            log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status,
                            headers={"x-request-id": request_id} if request_id else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = _logged_id(request)
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        where = f" under request id {request_id}" if request_id else ""
        return JSONResponse(ApiError(500, f"internal error; the server log has the details{where}").body(),
                            status_code=500, headers={"x-request-id": request_id} if request_id else None)

    @app.get("/health")
    async def health() -> dict:
        """200 once the decoder answers (its model loaded), 503 before. Also refreshes the
        model id, so a decoder restarted with another checkpoint is named right. It needs no
        key, so it names nothing a key guards: the model only where no key is needed, the
        decoder's address never."""
        info = await front.decoder_info()
        if settings.model_name is None:
            front.model_id = info.model_id
        return {"status": "ok", **({"model": front.model_id} if front.tokens is None else {})}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        front.authorize(request)
        return {"object": "list", "data": [_model_object(await front.model_name(), front.started)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        front.authorize(request)
        served = await front.model_name()
        if model_id != served:
            raise _unknown_model(model_id, served)
        return _model_object(served, front.started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        request.state.request_id = request_id = _request_id(request)
        use_request_id(request_id)  # every log line of this request carries it
        front.authorize(request)
        slot = front.admit()  # before the body is read: a refused request costs no memory
        try:
            chat = parse_chat_request(await _read_json(request, front.max_body_bytes, slot, front.executor,
                                                       settings.body_timeout_s))
            model = await front.model_name()
            if chat.model != model:
                raise _unknown_model(chat.model, model)
            media = await front.media.load(chat.media)
            if not media.in_body:  # read or downloaded: bytes the body's count does not hold
                slot.take_body_bytes(len(media.data))
            call = await asyncio.get_running_loop().run_in_executor(front.executor, front.start_caption, chat,
                                                                   media, request_id)
        except BaseException:
            slot.release()
            raise
        log.info("%s (%d bytes), %s", display_name(media.name), len(media.data),
                 "streaming" if chat.stream else "one answer")
        answer = _Answer(call, slot, request_id, model)
        if chat.stream:
            return await answer.events(request, chat.include_usage)
        return await answer.whole(request)

    return app


class _Answer:
    """One caption call answered over HTTP; owns the call and the slot until it ends."""

    def __init__(self, call: AsyncCaption, slot: Slot, request_id: str, model: str):
        self.call = call
        self.slot = slot
        self.request_id = request_id
        self.completion_id = f"chatcmpl-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.headers = {"x-request-id": request_id}
        self.failed = False  # the decoder refused or failed the call

    def finish(self) -> None:
        """Cancel the call if it still runs (the client left), and give the slot back."""
        if self.call.result is None and not self.failed:
            log.info("%s: the client left after %d generated tokens; caption cancelled",
                     self.request_id, self.call.token_count)
        self.call.close()
        self.slot.release()

    async def whole(self, request: Request) -> Response:
        try:
            result = await unless_disconnected(self._collect(), request.receive)
        except ClientGone:
            return Response(status_code=_CLIENT_CLOSED)
        except CaptionError as err:
            self.failed = True
            raise from_grpc(err.status, err.message) from None
        finally:
            self.finish()
        self._log_done(result)
        return JSONResponse(R.completion(self.completion_id, self.created, self.model, result), headers=self.headers)

    async def _collect(self):
        while await self.call.next_piece() is not None:
            pass
        return self.call.result

    async def events(self, request: Request, include_usage: bool) -> Response:
        try:
            first = await unless_disconnected(self.call.next_piece(), request.receive)
        except ClientGone:
            self.finish()
            return Response(status_code=_CLIENT_CLOSED)
        except CaptionError as err:
            self.failed = True
            self.finish()
            raise from_grpc(err.status, err.message) from None
        except BaseException:
            self.finish()
            raise
        return _EventStream(self._events(first, include_usage), self.finish, headers=self.headers)

    async def _events(self, first: str | None, include_usage: bool) -> AsyncIterator[str]:
        ids = (self.completion_id, self.created, self.model)
        yield R.event(R.chunk(*ids, {"role": "assistant", "content": ""}))
        piece = first
        try:
            while piece is not None:
                yield R.event(R.chunk(*ids, {"content": piece}))
                piece = await self.call.next_piece()
        except CaptionError as err:  # after the status went out: an error event ends the stream
            self.failed = True
            error = from_grpc(err.status, err.message)
            log.warning("%s: the decoder failed mid-stream: %s", self.request_id, err)
            yield R.event(error.body())
            yield R.DONE_EVENT
            return
        except Exception:  # noqa: BLE001 - a failure here: the stream still ends as the protocol says
            self.failed = True
            log.exception("%s: failed mid-stream", self.request_id)
            yield R.event(ApiError(500, f"internal error (request {self.request_id}); the server log has "
                                        "the details").body())
            yield R.DONE_EVENT
            return
        result = self.call.result
        self._log_done(result)
        yield R.event(R.chunk(*ids, {}, R.finish_reason(result)))
        if include_usage:
            yield R.event(R.usage_chunk(*ids, result))
        yield R.DONE_EVENT

    def _log_done(self, result) -> None:
        u = R.usage(result)
        log.info("%s: %d prompt + %d completion tokens (%s)", self.request_id, u["prompt_tokens"],
                 u["completion_tokens"], result.finish_reason)


class _EventStream(StreamingResponse):
    """Server-sent events that run ``on_close`` however the response ends (finished, client
    gone, server stopping), even if the body was never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], headers: dict):
        super().__init__(content, media_type="text/event-stream",
                         headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _bearer_allowed(tokens: TokenChecker, authorization: str | None) -> bool:
    """``Authorization: Bearer <an accepted token>`` (the token is checked whatever the scheme,
    so the time taken does not tell a wrong scheme from a wrong token)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return tokens.accepts(token.strip()) & (scheme.lower() == "bearer")


async def _read_json(request: Request, limit: int, slot: Slot, executor: Executor, timeout_s: float):
    """The request's JSON body, its bytes counted on ``slot`` (before they are read when the
    Content-Length says how many). It must arrive within ``timeout_s``: the caption's place is
    taken before it is read, and a client sending a byte now and then would hold it for good."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        if int(declared) > limit:
            raise _body_too_large(int(declared), limit)
        slot.take_body_bytes(int(declared))

    async def receive() -> tuple[bytes, int]:
        body, size = [], 0
        try:
            async for piece in request.stream():
                size += len(piece)
                if size > limit:
                    raise _body_too_large(size, limit)
                if size > slot.body_bytes:  # a chunked body, counted as it arrives
                    slot.take_body_bytes(size - slot.body_bytes)
                body.append(piece)
        except ClientDisconnect:  # a refusal line, not an internal error with its traceback
            raise ApiError(400, f"the client closed the connection after {size} bytes of its body") from None
        return b"".join(body), size

    try:
        data, size = await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s (body_timeout_s)") from None
    try:  # a body of megabytes (a video in base64) is parsed off the event loop
        if size < _PARSE_ON_LOOP_BYTES:
            return json.loads(data)
        return await asyncio.get_running_loop().run_in_executor(executor, json.loads, data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON for this server (nested too deeply)") from None


def _body_too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size}+ bytes; this server takes at most {limit} "
                         "(max_media_bytes as base64, plus 1 MiB)")


def _logged_id(request: Request) -> str | None:
    """A caption request's id (set first thing), made the current one for the log lines that
    follow; None for other requests."""
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        use_request_id(request_id)
    return request_id


def _request_id(request: Request) -> str:
    """The caller's ``x-request-id`` when it is a plain short id, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _CALLER_REQUEST_ID.match(given) else uuid.uuid4().hex[:24]


def _model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "pllava"}


def _unknown_model(asked: str, served: str) -> ApiError:
    return ApiError(404, f"the model {asked!r} does not exist here; this server serves {served!r} "
                         "(GET /v1/models)", param="model", code="model_not_found")
