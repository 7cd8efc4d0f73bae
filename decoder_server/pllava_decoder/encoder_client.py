"""The decoder's side of ``Encoder.Encode``: one channel to every encoder replica.

The channel uses gRPC round-robin load balancing over all the addresses the target
resolves to (``dns:///encoder:50051`` with ``docker compose --scale encoder=N``, or a static
list ``ipv4:127.0.0.1:50051,127.0.0.1:50061``), so calls spread over the replicas, and
client-side health checking: a replica gets calls only while its health service reports
``pllava.v1.Encoder`` SERVING, so one that is loading or draining is skipped, and one that was
restarted gets calls the moment it serves (the channel reconnects within 2 s of losing it).

Before each retry the client waits for a ready replica, at most ``ready_timeout_s``: a call
that failed with UNAVAILABLE (its replica died or is shutting down) is retried on another
replica as soon as one is ready -- not after a fixed pause that may be shorter than the time
a replica needs to come back -- and with none ready in time the call fails with UNAVAILABLE
saying so, instead of waiting for the whole encoder deadline. INVALID_ARGUMENT (a bad video)
is the caller's problem and is not retried: it propagates with the encoder's own message.

Over TLS (``tls``) the channel checks the encoders' certificates against the target's host
(the one host of a static list); with ``token`` every call carries ``authorization: Bearer``.
A transport mismatch (a plaintext decoder against TLS encoders, a missing client
certificate, an unknown CA) is reported with its likely cause and the setting to change.

Failures are raised as :class:`EncoderError` subclasses that are also the exception types
:mod:`pllava_serving.errors` maps to the matching status code (a rejected video is a
``ValueError`` -> INVALID_ARGUMENT, an unreachable encoder ``Unavailable`` -> UNAVAILABLE,
...), so the decoder's own interceptor reports them without special cases.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
import numpy as np

from pllava_client.channel import MAX_MESSAGE_BYTES, channel_options, health_checked, tls_server_name
from pllava_client.codec import TensorAssembler, bf16_bits_to_float32
from pllava_client.security import ClientTls, bearer_metadata, explain_unavailable
from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc
from pllava_serving.errors import REQUEST_ID_METADATA, Overloaded, Unavailable

log = logging.getLogger(__name__)

#: The health-service name an encoder reports SERVING once it has loaded and warmed up.
ENCODER_SERVICE = pllava_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name


class EncoderError(Exception):
    """An Encode call failed (or answered nonsense): INTERNAL unless a subclass says otherwise.
    Logged at WARNING whatever its status: the encoders failed a caption, which an operator
    filtering at WARNING must see (``log_level``, read by pllava_serving.errors)."""

    log_level = logging.WARNING


class EncoderRejected(EncoderError, ValueError):
    """The encoder refused the video (INVALID_ARGUMENT); the message is the encoder's. The
    input's fault, not the encoders': logged at INFO like other refusals."""

    log_level = logging.INFO


class EncoderUnavailable(EncoderError, Unavailable):
    """No encoder replica could take the call, retries included (UNAVAILABLE)."""


class NoReadyEncoder(EncoderUnavailable):
    """No encoder replica was ready within ``ready_timeout_s`` (UNAVAILABLE). The decoder has
    waited already: a client retrying at once would wait again for the same replicas."""

    retry = False


class EncoderTimeout(EncoderError, TimeoutError):
    """The encoder did not answer before the deadline (DEADLINE_EXCEEDED)."""


class EncoderOverloaded(EncoderError, Overloaded):
    """The encoders' queues are full (RESOURCE_EXHAUSTED)."""


@dataclass
class Encoded:
    """Pooled visual tokens of one video and where the time went (milliseconds)."""

    visual: np.ndarray  # (V, D) float32
    num_frames: int
    model_id: str
    video_decode_ms: float
    encode_ms: float
    transfer_ms: float  # the whole call minus the encoder's decode and encode: network + its queue
    attempts: int
    wire_bytes: int = 0  # bytes of the tensor as the encoder sent it (before conversion to float32)


class EncoderClient:
    """``await client.encode(video, num_frames, request_id)`` against ``target``.

    ``tls``: reach the encoders over TLS (None: plaintext). ``token``: returns the bearer token
    to send, asked on every call so a token file that changes is followed (None: no token).
    ``on_call(outcome, attempts, seconds)`` is told how each :meth:`encode` ended: a gRPC code
    name ("OK", "UNAVAILABLE", ...; "INTERNAL" for an answer that makes no sense, "CANCELLED"
    when its caller went away), the attempts it took and its time (the decoder's metrics).
    """

    def __init__(self, target: str, *, timeout_s: float = 120.0, retries: int = 2,
                 ready_timeout_s: float = 30.0, hidden_size: int | None = None, model_id: str | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 tls: ClientTls | None = None, token: Callable[[], str] | None = None,
                 on_call: Callable[[str, int, float], None] | None = None):
        self.target = target
        self.on_call = on_call
        self.max_message_bytes = max_message_bytes  # the largest Encode request it may send
        self.timeout_s = timeout_s
        self.retries = retries
        self.ready_timeout_s = ready_timeout_s
        self.hidden_size = hidden_size  # width the decoder expects; None = do not check
        self.model_id = model_id  # identity the decoder expects; None = do not check
        self.tls = tls
        self.token = token
        # Checked now: a TLS target listing several hosts is a settings error, not a call's.
        self._server_name = tls_server_name(target) if tls is not None else None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pllava_pb2_grpc.EncoderStub | None = None

    def _ensure_channel(self) -> pllava_pb2_grpc.EncoderStub:
        # grpc.aio channels belong to the event loop they are created on: create lazily there.
        if self._stub is None:
            options = channel_options(self.max_message_bytes, round_robin=True,
                                      service_config=health_checked(ENCODER_SERVICE))
            if self.tls is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                if self._server_name:
                    options.append(("grpc.ssl_target_name_override", self._server_name))
                self._channel = grpc.aio.secure_channel(self.target, self.tls.credentials(), options=options)
            self._stub = pllava_pb2_grpc.EncoderStub(self._channel)
        return self._stub

    def connect(self) -> None:
        """Start connecting to every replica now (call on the event loop that will make the
        calls). Round robin picks among the replicas that are connected and SERVING, so a
        channel first opened by a burst of calls sends the whole burst to whichever replica
        answered first (7 of 8 videos on one of two replicas, on a first burst after start)."""
        self._ensure_channel()
        self._channel.get_state(try_to_connect=True)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def encode(self, video: bytes = b"", num_frames: int = 0, request_id: str = "", video_name: str = "",
                     timeout_s: float | None = None, *, frames: Sequence[bytes] | None = None) -> Encoded:
        """Visual tokens of ``video``, or of ``frames`` (encoded images the caller sampled) when
        given; ``timeout_s`` caps the whole call including retries (default: the client's
        ``timeout_s``). Raises :class:`EncoderError`."""
        stub = self._ensure_channel()
        content = (dict(video=video) if frames is None else dict(frames=pllava_pb2.Frames(images=frames)))
        request = pllava_pb2.EncodeRequest(num_frames=num_frames, request_id=request_id, video_name=video_name,
                                           **content)
        start = time.perf_counter()
        deadline = start + (self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s))
        last_error = ""
        outcome, attempts = "", 0
        try:
            for attempt in range(1, self.retries + 2):
                attempts = attempt
                if attempt > 1:  # the first goes at once: it fails fast, with gRPC's reason, if none is ready
                    await self._wait_for_ready_replica(deadline, attempt, last_error)
                try:
                    encoded = await self._encode_once(stub, request, deadline, start, attempt)
                    outcome = "OK"
                    return encoded
                except grpc.aio.AioRpcError as err:
                    code, details = err.code(), err.details() or ""
                    if code == grpc.StatusCode.UNAVAILABLE and attempt <= self.retries:
                        log.warning("%s: encoder at %s unavailable (%s); retrying on another replica once one "
                                    "is ready (%d of %d)", request_id or "request", self.target, details, attempt,
                                    self.retries)
                        last_error = details
                        continue
                    if code == grpc.StatusCode.UNAVAILABLE:
                        details = explain_unavailable(details, self.tls,
                                                      plaintext_hint="encoder_tls_ca (--encoder-tls-ca)",
                                                      server="the encoder")
                    outcome = code.name
                    raise _as_encoder_error(code, details, self.target, attempt) from None
            raise AssertionError("unreachable")
        except asyncio.CancelledError:
            outcome = outcome or "CANCELLED"
            raise
        except EncoderError as exc:
            outcome = outcome or _outcome_of(exc)
            raise
        finally:
            if self.on_call is not None:
                self.on_call(outcome or "UNKNOWN", attempts, time.perf_counter() - start)

    async def _wait_for_ready_replica(self, deadline: float, attempt: int, last_error: str) -> None:
        """Return once some replica is connected and SERVING (at once, usually); raise
        NoReadyEncoder after ``ready_timeout_s``, EncoderTimeout at the call's deadline."""
        channel = self._channel
        state = channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            return
        started = time.perf_counter()
        until = min(deadline, started + self.ready_timeout_s)
        log.info("waiting up to %.0f s for an encoder replica at %s to be ready (%s)",
                 until - started, self.target, state.name)
        while state != grpc.ChannelConnectivity.READY:
            left = until - time.perf_counter()
            if state == grpc.ChannelConnectivity.SHUTDOWN or left <= 0:
                break
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), left)
            except asyncio.TimeoutError:
                break
            state = channel.get_state(try_to_connect=True)
        else:
            log.info("an encoder replica at %s is ready after %.1f s", self.target, time.perf_counter() - started)
            return
        if until >= deadline:
            raise EncoderTimeout(f"no encoder replica at {self.target} was ready before the deadline")
        last = explain_unavailable(last_error, self.tls, plaintext_hint="encoder_tls_ca (--encoder-tls-ca)",
                                   server="the encoder")
        raise NoReadyEncoder(f"no encoder replica at {self.target} was ready (connected and SERVING) within "
                             f"{self.ready_timeout_s:g} s (encoder_ready_timeout_s); {attempt - 1} attempt(s) "
                             f"failed, the last with: {last}")

    async def _encode_once(self, stub, request, deadline: float, start: float, attempt: int) -> Encoded:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise EncoderTimeout(f"no encoder at {self.target} answered in time")
        # The id goes in the request and as metadata, so the encoder logs under the same id.
        metadata = [(REQUEST_ID_METADATA, request.request_id)] if request.request_id else []
        if self.token is not None:
            metadata += bearer_metadata(self.token())
        call = stub.Encode(request, timeout=left, metadata=metadata or None)
        header, assembler = None, None
        async for response in call:
            which = response.WhichOneof("payload")
            if which == "header":
                if header is not None:
                    raise _protocol_error(self.target, "sent a second header")
                header = response.header
                try:
                    assembler = TensorAssembler(header.visual_tokens)
                except ValueError as exc:  # the encoder's fault, not the caller's: not INVALID_ARGUMENT
                    raise _protocol_error(self.target, f"announced an unusable tensor: {exc}") from None
            elif which == "chunk":
                if assembler is None:
                    raise _protocol_error(self.target, "sent tensor bytes before the header")
                try:
                    assembler.add(response.chunk)
                except ValueError as exc:
                    raise _protocol_error(self.target, str(exc)) from None
        if header is None:
            raise _protocol_error(self.target, "ended the stream without a header")
        try:
            raw = assembler.finish()
        except ValueError as exc:
            raise _protocol_error(self.target, str(exc)) from None
        visual = _to_float32(raw, header.visual_tokens.dtype)
        self._check(header, visual)
        total_ms = (time.perf_counter() - start) * 1e3
        t = header.timings
        return Encoded(visual=visual, num_frames=header.num_frames, model_id=header.model_id,
                       video_decode_ms=t.video_decode_ms, encode_ms=t.encode_ms,
                       transfer_ms=max(total_ms - t.video_decode_ms - t.encode_ms, 0.0), attempts=attempt,
                       wire_bytes=int(raw.nbytes))

    def _check(self, header: pllava_pb2.EncodeHeader, visual: np.ndarray) -> None:
        if self.model_id is not None and header.model_id != self.model_id:
            raise EncoderError(f"the encoder at {self.target} serves model {header.model_id!r} but this decoder "
                               f"serves {self.model_id!r}: point both at the same checkpoint")
        if visual.ndim != 2 or (self.hidden_size is not None and visual.shape[1] != self.hidden_size):
            raise _protocol_error(self.target, f"sent visual tokens of shape {tuple(visual.shape)}; expected "
                                               f"(num_visual_tokens, {self.hidden_size})")


def _to_float32(raw: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == pllava_pb2.DTYPE_BFLOAT16:
        return bf16_bits_to_float32(raw)
    if dtype in (pllava_pb2.DTYPE_FLOAT32, pllava_pb2.DTYPE_FLOAT16):
        return np.asarray(raw, dtype=np.float32)
    raise EncoderError(f"the encoder sent visual tokens of dtype {pllava_pb2.DType.Name(dtype)}; expected a float type")


def _protocol_error(target: str, what: str) -> EncoderError:
    return EncoderError(f"the encoder at {target} {what}")


def _outcome_of(exc: EncoderError) -> str:
    """The code name an EncoderError not raised from a gRPC status stands for."""
    for kind, name in ((EncoderRejected, "INVALID_ARGUMENT"), (EncoderUnavailable, "UNAVAILABLE"),
                       (EncoderTimeout, "DEADLINE_EXCEEDED"), (EncoderOverloaded, "RESOURCE_EXHAUSTED")):
        if isinstance(exc, kind):
            return name
    return "INTERNAL"  # an answer that makes no sense


def _as_encoder_error(code: grpc.StatusCode, details: str, target: str, attempts: int) -> EncoderError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return EncoderRejected(details)  # the encoder names the problem with the video
    if code == grpc.StatusCode.UNAVAILABLE:
        return EncoderUnavailable(f"no encoder reachable at {target} after {attempts} attempt(s): {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return EncoderTimeout(f"the encoder at {target} did not finish in time: {details}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return EncoderError(f"the encoder at {target} refused this decoder ({code.name}: {details}): set "
                            "encoder_token_file (--encoder-token-file) to a file holding a token the "
                            "encoders accept")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details:
        # gRPC's own size limit, not a full queue: the same video would be refused again
        return EncoderRejected(f"the video is larger than the encoders at {target} accept ({details}): their "
                               "max_video_bytes is below this decoder's; send a smaller video, or raise the "
                               "encoders' limit to the decoder's")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return EncoderOverloaded(f"the encoders at {target} are overloaded: {details}")
    return EncoderError(f"the encoder at {target} failed with {code.name}: {details}")
