"""``pllava-decoder``: the language half of PLLaVA as the ``pllava.v1.Decoder`` service.

One caption, end to end::

    CaptionRequest -> limits (max_prompt_chars, max_video_bytes: INVALID_ARGUMENT)
                   -> sampling params, prompt ids (as pllava.pipeline.Captioner builds them);
                      the video's frame count (for frames sent as images, the rule of
                      pllava.frame_images.frames_num_frames)
                   -> admission (RESOURCE_EXHAUSTED beyond max_queue waiting)
                   -> visual tokens: the cache, or an encoder replica (awaited here, on the
                      event loop, while the engine thread keeps decoding other requests)
                   -> EngineLoop.submit -> TokenEvent per generated token -> FinalEvent

The servicer only converts messages; the engine loop batches, the encoder client balances
and retries, and :mod:`pllava_serving.errors` turns exceptions into status codes (bad
request fields and videos -> INVALID_ARGUMENT, a full queue -> RESOURCE_EXHAUSTED).
A client that cancels or whose deadline passes cancels the handler, which cancels the
request in the engine: its KV slot is free at the next step.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pllava import __version__
from pllava.config import PllavaConfig, end_token_ids
from pllava.frame_images import frames_num_frames
from pllava.generation import ContextOverflowError, Engine, FinishReason, Request, SequenceStats
from pllava.model import PllavaLanguage, stored_half_weights
from pllava.pipeline import timings_from
from pllava.prompt import DEFAULT_QUESTION, DEFAULT_TEMPLATE, TEMPLATES, build_prompt, default_question
from pllava.precompile import compile_in_child, is_precompiled
from pllava.runtime import compile_cache_lock, dtype_name, enable_compile_cache, setup_backend
from pllava.sampling import SamplingParams
from pllava.shapes import ShapePlan
from pllava.tokenizer import Tokenizer
from pllava.video import VideoError
from pllava_client.channel import MAX_MESSAGE_BYTES, tls_server_name
from pllava_client.codec import to_wire_dtype
from pllava_client.security import ClientTls
from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc
from pllava_serving.errors import Unavailable, current_request_id, display_name
from pllava_serving.metrics import INPUT_FRAMES, INPUT_VIDEO, new_registry, start_metrics_server
from pllava_serving.model_id import model_id
from pllava_serving.parent_death import parent_death_env
from pllava_serving.security import ServerSecurity, TokenFile
from pllava_serving.server import (Service, create_server, format_address, freeze_startup_heap, run_main,
                                   serve_forever)

from .encoder_client import Encoded, EncoderClient
from .engine_loop import EngineLoop
from .metrics import DecoderMetrics
from pllava_serving.settings import add_server_flags, concurrent_rpc_limit

from .settings import ENV_PREFIX, DecoderSettings
from .visual_cache import CachedVisual, VisualCache, visual_key

log = logging.getLogger("pllava_decoder")

#: Videos (or all frames of a request) above this size are hashed off the event loop.
_HASH_INLINE_BYTES = 4 << 20
#: Room for a CaptionRequest's other fields beside the largest video it may carry.
_REQUEST_OVERHEAD_BYTES = 1 << 20


def max_message_bytes(max_video_bytes: int) -> int:
    """gRPC message limit for a decoder that accepts videos up to ``max_video_bytes``: its
    Caption requests in, and its Encode calls out."""
    return max(max_video_bytes + _REQUEST_OVERHEAD_BYTES, MAX_MESSAGE_BYTES)


@dataclass
class LanguageModel:
    """What the decoder loads: the language side with ``max_batch`` KV slots, and the tokenizer."""

    path: Path
    cfg: PllavaConfig  # the checkpoint's, for per-request frame counts
    num_frames: int  # frames per video when a request says 0
    tokenizer: Tokenizer
    engine: Engine
    model_id: str
    dtype: str
    max_context: int
    compile_cache: Path | None = None  # where compiled graphs are kept, if anywhere

    @classmethod
    def load(cls, settings: DecoderSettings) -> "LanguageModel":
        path = Path(settings.model)
        folder = path.parent if path.is_file() else path
        backend = setup_backend(settings.device, settings.device_id, settings.dtype)
        cfg = PllavaConfig.from_pretrained(folder)
        tokenizer = Tokenizer.from_pretrained(folder)
        if tokenizer.image_token_id != cfg.image_token_index:
            raise ValueError(f"tokenizer's <image> id {tokenizer.image_token_id} differs from config "
                             f"image_token_index {cfg.image_token_index}")
        max_context = settings.context_for(cfg.text.max_position_embeddings)
        half_weights = stored_half_weights(path)  # (read once: the cache key and the model)
        cache_dir = None
        if settings.compile_cache:
            try:
                cache_dir = enable_compile_cache(
                    settings.compile_cache, (folder / "config.json").read_text(), half_weights,
                    backend.device, dtype_name(backend.dtype), settings.max_batch, max_context,
                    settings.prefill_chunk, settings.prefill_small_chunk, settings.small_chunk_parts,
                    settings.min_context)
                log.info("compiled graphs cached in %s", cache_dir)
            except OSError as exc:
                log.warning("no compile cache (%s): every start compiles all graphs", exc)
        shapes = dict(num_slots=settings.max_batch, max_len=max_context, prefill_chunk=settings.prefill_chunk,
                      prefill_small_chunk=settings.prefill_small_chunk, small_chunk_parts=settings.small_chunk_parts,
                      min_context=settings.min_context)
        if cache_dir is not None and settings.compile_in_child:
            precompile(folder, cache_dir, ShapePlan(**shapes), settings, dtype_name(backend.dtype))
        language = PllavaLanguage.from_pretrained(path, cfg, backend, settings.lora_alpha, half_weights=half_weights,
                                                  **shapes)
        return cls(path=path, cfg=cfg, num_frames=settings.num_frames or cfg.num_frames, tokenizer=tokenizer,
                   engine=Engine(language, tokenizer, end_token_ids(folder, tokenizer.eos_token_id),
                                 max_gap_steps=settings.max_gap_steps,
                                 max_gap_stretch=settings.max_gap_stretch,
                                 queued_weight=settings.queued_weight, reuse_prefixes=settings.reuse_prefixes),
                   model_id=model_id(path, settings.lora_alpha),
                   dtype=dtype_name(backend.dtype), max_context=max_context, compile_cache=cache_dir)

    def num_visual_tokens(self, num_frames: int) -> int:
        return self.cfg.with_frames(num_frames).num_visual_tokens

    def check_fits(self, prompt_ids: list[int], num_frames: int) -> None:
        """Refuse a prompt that cannot fit before any encoder time is spent on its video."""
        visual = self.num_visual_tokens(num_frames)
        length = len(prompt_ids) - 1 + visual
        if length >= self.max_context:
            raise ContextOverflowError(
                f"the prompt is {length} tokens ({len(prompt_ids)} text + {visual} visual for {num_frames} frames) "
                f"but the context holds {self.max_context} (max_context) and needs room for one generated "
                "token: shorten the prompt, use fewer frames or raise the max context")


def precompile(config_folder: Path, cache_dir: Path, plan: ShapePlan, settings: DecoderSettings,
               dtype: str) -> None:
    """Compile the graphs in a child process when the cache does not hold them yet (see
    :mod:`pllava.precompile`); if the child fails, this process compiles them at warm-up."""
    with compile_cache_lock(cache_dir):
        if is_precompiled(cache_dir):
            return
        log.info("compiling the graphs in a child process into %s (the first start with this setup; "
                 "later starts load them)", cache_dir)
        try:
            seconds = compile_in_child(config_folder, cache_dir, plan, settings.device, settings.device_id, dtype,
                                       env=parent_death_env(signal.SIGKILL))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log.warning("compiling in a child process failed, so this process compiles its graphs itself: %s", exc)
            return
        log.info("the child process compiled the graphs in %.1f s", seconds)


def sampling_params(pb: pllava_pb2.SamplingParams, default_max_new_tokens: int) -> SamplingParams:
    """Proto -> SamplingParams; unset fields keep the defaults (greedy). ValueError if invalid."""
    kwargs = dict(max_new_tokens=pb.max_new_tokens or default_max_new_tokens, stop=tuple(pb.stop))
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if pb.HasField(name):
            kwargs[name] = getattr(pb, name)
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise ValueError(f"invalid sampling parameters: {exc}") from None


FINISH_REASONS = {FinishReason.STOP: pllava_pb2.FINISH_REASON_STOP,
                  FinishReason.LENGTH: pllava_pb2.FINISH_REASON_LENGTH,
                  FinishReason.CONTEXT_LENGTH: pllava_pb2.FINISH_REASON_CONTEXT_LENGTH,
                  FinishReason.STOP_STRING: pllava_pb2.FINISH_REASON_STOP_STRING,
                  FinishReason.CANCELLED: pllava_pb2.FINISH_REASON_CANCELLED}


def matched_stop(full_text: str, caption: str, stops: tuple[str, ...]) -> str:
    """The stop string that ended a caption: the one found right after the emitted text."""
    return next((s for s in stops if full_text.startswith(s, len(caption))), "")


class DecoderServicer(pllava_pb2_grpc.DecoderServicer):
    """``Decoder.Caption`` and ``Decoder.GetInfo``. Answers UNAVAILABLE until :meth:`load`
    has loaded the model, compiled its graphs and started the engine (a request that arrives
    during the warm-up caption after that is served; health says SERVING once it is done)."""

    def __init__(self, settings: DecoderSettings):
        self.settings = settings
        self.model: LanguageModel | None = None
        self.loop: EngineLoop | None = None
        self.encoder: EncoderClient | None = None
        # Read now, so a missing certificate or token file stops the start before the model loads.
        self.encoder_tls = ClientTls.from_files(settings.encoder_tls_ca, settings.encoder_tls_cert,
                                                settings.encoder_tls_key,
                                                names=("encoder_tls_ca", "encoder_tls_cert", "encoder_tls_key"))
        self.encoder_token = (TokenFile(settings.encoder_token_file, "encoder_token_file")
                              if settings.encoder_token_file else None)
        if self.encoder_tls is not None:
            tls_server_name(settings.encoder)  # ValueError now for a TLS list of several hosts
        self.cache = VisualCache(settings.visual_cache_bytes)
        self._serial = itertools.count(1)
        # This server's own registry: RPC statuses (create_server), engine loop, cache.
        self.metrics = DecoderMetrics(new_registry())
        self.metrics.watch_cache(self.cache)

    # ---- lifecycle --------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the language side and compile every graph its shape plan can use (off the
        event loop, so health keeps answering NOT_SERVING), then start the engine thread and
        run a dummy request through it."""
        s = self.settings
        t0 = time.perf_counter()
        self.model = await asyncio.to_thread(LanguageModel.load, s)
        await asyncio.to_thread(self._compile_graphs)
        self.loop = EngineLoop(self.model.engine, s.max_queue, self.metrics).start()
        self.encoder = EncoderClient(s.encoder, timeout_s=s.encoder_timeout_s, retries=s.encoder_retries,
                                     ready_timeout_s=s.encoder_ready_timeout_s,
                                     hidden_size=self.model.cfg.text.hidden_size, model_id=self.model.model_id,
                                     max_message_bytes=max_message_bytes(s.max_video_bytes),
                                     tls=self.encoder_tls,
                                     token=self.encoder_token.first if self.encoder_token else None,
                                     on_call=self.metrics.record_encoder_call)
        self.encoder.connect()  # connected to every replica before the first burst of calls
        t1 = time.perf_counter()
        await self.warm_up()
        log.info("model %s loaded in %.1f s, warmed up in %.1f s: %d slots x %d tokens, %s on %s",
                 self.model.model_id, t1 - t0, time.perf_counter() - t1, s.max_batch, self.model.max_context,
                 self.model.dtype, s.device)

    def _compile_graphs(self) -> None:
        """Every graph a step can run (decode, prefill, and a chunk with decode rows in one
        call, whole or in parts: ``PllavaLanguage.warm_up``), so that no request ever waits
        for a compile."""
        start = time.perf_counter()
        language = self.model.engine.language

        def progress(done: int, total: int, kind: str, size: int, context: int) -> None:
            log.info("compiled %d/%d graphs (%s %d x %d positions) in %.1f s",
                     done, total, kind, size, context, time.perf_counter() - start)

        with compile_cache_lock(self.model.compile_cache):
            language.warm_up(progress)

    async def warm_up(self) -> None:
        """One dummy request end to end through the engine thread (graphs are compiled). One
        frame's visual tokens: the path is the same at any length, and a 16-frame prompt took
        10 s of the warm-up on the benchmark model."""
        m = self.model
        ids = m.tokenizer.encode(build_prompt(DEFAULT_QUESTION, DEFAULT_TEMPLATE))
        visual = np.zeros((m.num_visual_tokens(1), m.cfg.text.hidden_size), dtype=np.float32)
        async with self.loop.submit(Request(ids, visual, SamplingParams(max_new_tokens=2), "warm-up")) as stream:
            async for _ in stream:
                pass

    async def close(self) -> None:
        if self.loop is not None:
            held = await asyncio.to_thread(self.loop.held)
            log.info("held at shutdown: %d of %d KV slots, %d requests waiting, %d streams open",
                     held["slots"], held["slots_total"], held["waiting"], held["streams"])
            self.loop.stop(timeout=10)
        if self.encoder is not None:
            await self.encoder.close()

    # ---- RPCs -------------------------------------------------------------------------------
    async def Caption(self, request: pllava_pb2.CaptionRequest, context):
        start = time.perf_counter()
        m, loop = self._ready()
        self._check_limits(request)
        params = sampling_params(request.sampling, self.settings.max_new_tokens)
        template = request.template or DEFAULT_TEMPLATE
        prompt = build_prompt(request.prompt or default_question(template), template)
        prompt_ids = m.tokenizer.encode(prompt)
        num_frames = self._num_frames(request)
        m.check_fits(prompt_ids, num_frames)

        token_ids: list[int] = []
        caption, last = "", None
        with loop.admit() as admission:
            visual, encoded = await self._visual_tokens(request, num_frames, context)
            # Engine ids must be unique; the caller's request id need not be.
            engine_request = Request(prompt_ids, visual.visual, params, f"{current_request_id()}#{next(self._serial)}")
            stream = loop.submit(engine_request, admission)
            # However the RPC ends (client cancel, deadline, server stop), free the slot at once,
            # even if grpc abandons this generator without closing it.
            context.add_done_callback(lambda _: stream.cancel())
            try:
                async with stream:
                    async for event in stream:
                        if context.cancelled():  # belt and braces: a cancel grpc did not raise here
                            stream.cancel()
                            log.info("stopped after %d generated tokens: the client cancelled", len(token_ids))
                            return
                        if event.token_id is not None:
                            if not token_ids:
                                self.metrics.record_first_token(time.perf_counter() - start)
                            token_ids.append(event.token_id)
                        caption += event.text
                        last = event
                        if event.token_id is not None or event.text:
                            yield pllava_pb2.CaptionEvent(token=pllava_pb2.TokenEvent(
                                text=event.text, token_ids=[] if event.token_id is None else [event.token_id]))
            except (asyncio.CancelledError, GeneratorExit):
                log.info("stopped after %d generated tokens", len(token_ids))  # (why: the next line)
                raise
        if last is None or last.finish_reason is None:  # cancelled from outside the stream
            return

        stats: SequenceStats = last.stats
        self.metrics.record_caption(last.finish_reason.value, len(token_ids), stats.finished - stats.first_token,
                                    stats.reused_tokens)
        video_s, encode_s = ((encoded.video_decode_ms / 1e3, encoded.encode_ms / 1e3) if encoded else (0.0, 0.0))
        timings = timings_from(stats, video_s, encode_s, start, transfer_s=encoded.transfer_ms / 1e3 if encoded else 0.0)
        reason = FINISH_REASONS[last.finish_reason]
        stop = (matched_stop(m.tokenizer.decode(token_ids), caption, params.stop)
                if reason == pllava_pb2.FINISH_REASON_STOP_STRING else "")
        log.info("captioned %s: %d prompt (%d positions reused) + %d visual tokens -> %d tokens (%s), "
                 "ttft %.0f ms, %.1f tok/s%s", display_name(request.video_name) or "video", len(prompt_ids),
                 stats.reused_tokens,
                 len(visual.visual), len(token_ids),
                 pllava_pb2.FinishReason.Name(reason), timings["time_to_first_token_ms"],
                 timings["decode_tokens_per_s"], ", visual tokens cached" if encoded is None else "")
        yield pllava_pb2.CaptionEvent(final=pllava_pb2.FinalEvent(
            finish_reason=reason, caption=caption, prompt=prompt, prompt_token_ids=prompt_ids,
            token_ids=token_ids, num_visual_tokens=len(visual.visual), num_prompt_tokens=len(prompt_ids),
            num_generated_tokens=len(token_ids), num_frames=visual.num_frames,
            timings=pllava_pb2.Timings(**timings), visual_tokens_cached=encoded is None, stop_string=stop,
            model_id=m.model_id, request_id=current_request_id(), num_prompt_tokens_reused=stats.reused_tokens))

    async def GetInfo(self, request: pllava_pb2.GetInfoRequest, context) -> pllava_pb2.ModelInfo:
        m, _ = self._ready()
        s = self.settings
        device = s.device if s.device == "CPU" else f"{s.device}:{s.device_id}"
        return pllava_pb2.ModelInfo(
            model_id=m.model_id, model_path=str(m.path), model_type=m.cfg.model_type,
            role=pllava_pb2.SERVER_ROLE_DECODER, dtype=to_wire_dtype(m.dtype), device=device,
            num_frames=m.num_frames, pooling_shape=list(m.cfg.with_frames(m.num_frames).pooling_shape),
            num_visual_tokens=m.num_visual_tokens(m.num_frames), text_hidden_size=m.cfg.text.hidden_size,
            max_context=m.max_context, max_batch=s.max_batch, max_queue=s.max_queue,
            templates=[DEFAULT_TEMPLATE, *sorted(t for t in TEMPLATES if t != DEFAULT_TEMPLATE)],
            encoder_target=s.encoder, version=__version__)

    # ---- helpers ----------------------------------------------------------------------------
    def _check_limits(self, request: pllava_pb2.CaptionRequest) -> None:
        """The operator's limits, checked before any work (INVALID_ARGUMENT: the same request
        would be refused again, so clients must not retry it)."""
        s, name = self.settings, display_name(request.video_name)
        if len(request.prompt) > s.max_prompt_chars:
            raise ValueError(f"the prompt is {len(request.prompt)} characters, more than this decoder accepts "
                             f"(max_prompt_chars={s.max_prompt_chars}); shorten the question")
        if len(request.video) > s.max_video_bytes:
            raise VideoError(f"{name or 'the video'}: the file is {len(request.video)} bytes, more than "
                             f"this decoder accepts (max_video_bytes={s.max_video_bytes})")
        frames_bytes = sum(len(image) for image in request.frames.images)
        if frames_bytes > s.max_video_bytes:
            raise VideoError(f"{name or 'frames'}: the {len(request.frames.images)} frames are "
                             f"{frames_bytes} bytes together, more than this decoder accepts "
                             f"(max_video_bytes={s.max_video_bytes})")

    def _num_frames(self, request: pllava_pb2.CaptionRequest) -> int:
        """The model's frame count for the request (sent on to the encoder); refuses a request
        with no video and no frames."""
        name = display_name(request.video_name)
        if request.WhichOneof("input") == "frames":
            images = request.frames.images
            if not images:
                raise VideoError(f"{name or 'frames'}: no frames (CaptionRequest.frames.images is "
                                 "empty); send at least one image")
            return frames_num_frames(request.num_frames, len(images), self.model.num_frames)
        if not request.video:
            raise VideoError(f"{name or 'the request'}: no video (CaptionRequest.video is empty)")
        return request.num_frames or self.model.num_frames

    def _ready(self) -> tuple[LanguageModel, EngineLoop]:
        if self.model is None or self.loop is None:
            raise Unavailable("the decoder is still loading its model; retry shortly")
        return self.model, self.loop

    async def _visual_tokens(self, request, num_frames: int, context) -> tuple[CachedVisual, Encoded | None]:
        """-> (visual tokens, the encoder's answer or None on a cache hit)."""
        frames = list(request.frames.images) if request.WhichOneof("input") == "frames" else None
        content = request.video if frames is None else frames
        input_kind = INPUT_VIDEO if frames is None else INPUT_FRAMES
        key = None
        if self.cache.max_bytes:
            size = len(content) if frames is None else sum(len(image) for image in frames)
            key_args = (content, num_frames, self.model.model_id)
            key = (visual_key(*key_args) if size <= _HASH_INLINE_BYTES
                   else await asyncio.to_thread(visual_key, *key_args))
            hit = self.cache.get(key)
            self.metrics.record_cache_lookup(input_kind, hit is not None)
            if hit is not None:
                return hit, None
        encoded = await self.encoder.encode(request.video, num_frames, current_request_id(),
                                            display_name(request.video_name),
                                            timeout_s=context.time_remaining(), frames=frames)
        self.metrics.visual_token_bytes_received.inc(encoded.wire_bytes)
        entry = CachedVisual(encoded.visual, encoded.num_frames)
        if key is not None:
            self.cache.put(key, entry)
        return entry, encoded


# ---- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pllava-decoder",
        description="PLLaVA decoder server: captions videos, getting their visual tokens from encoder replicas. "
                    "Settings: defaults < --config YAML < PLLAVA_DECODER_* environment < flags.")
    add_server_flags(p, DecoderSettings)
    p.add_argument("--encoder", metavar="TARGET",
                   help="gRPC target of the encoder replicas, round-robin balanced (default dns:///127.0.0.1:50051; "
                        "e.g. dns:///encoder:50051 or ipv4:127.0.0.1:50051,127.0.0.1:50061)")
    p.add_argument("--max-batch", type=int, help="sequences decoded together = KV-cache slots (default 8)")
    p.add_argument("--max-context", type=int,
                   help="tokens per sequence (default: max_position_embeddings, at most 4096)")
    p.add_argument("--max-queue", type=int,
                   help="requests without a token yet (encoding, waiting for a slot, prefill) before "
                        "RESOURCE_EXHAUSTED (default 32)")
    p.add_argument("--prefill-chunk", type=int,
                   help="prompt tokens per prefill step while no other stream decodes, a multiple of 16 "
                        "(default 256)")
    p.add_argument("--prefill-small-chunk", type=int,
                   help="prompt tokens of a prompt's tail, and the shortest prefill step while other streams "
                        f"decode, a multiple of 16 (default {DecoderSettings.prefill_small_chunk})")
    p.add_argument("--max-gap-steps", type=float,
                   help="while a prompt is admitted, each running stream waits at most about this many decode "
                        "steps between tokens: longer prefill chunks run when their measured time fits "
                        f"(default {DecoderSettings.max_gap_steps}; 1 = short chunks only)")
    p.add_argument("--small-chunk-parts", type=int,
                   help="a shortest prefill step measured longer than that wait runs in this many steps, each "
                        "through a share of the layers beside the decode rows "
                        f"(default {DecoderSettings.small_chunk_parts}; 1 = whole only)")
    p.add_argument("--max-gap-stretch", type=float,
                   help="while prompts queue behind the one entering, that wait may grow up to this factor "
                        f"(default {DecoderSettings.max_gap_stretch}; 1 = never longer)")
    p.add_argument("--queued-weight", type=float,
                   help="that factor is 1 + this x the prompts queued behind the one entering / the streams "
                        f"decoding (default {DecoderSettings.queued_weight}; 0 = never longer)")
    p.add_argument("--min-context", type=int,
                   help="smallest context bucket (default 512); buckets double up to max context and, "
                        "without the CPU kernels, a decode step reads each sequence's cache up to the bucket "
                        "of the longest")
    p.add_argument("--reuse-prefixes", action=argparse.BooleanOptionalAction, default=None,
                   help="start a prompt after the leading text (before <image>) whose cache rows a slot still "
                        "holds, and let streams with the same leading text read it from one slot as they "
                        "decode: the same tokens, less prefill (default on)")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="folder that keeps compiled graphs across restarts (default ~/.cache/pllava/compile; "
                        "'' = off)")
    p.add_argument("--compile-in-child", action=argparse.BooleanOptionalAction, default=None,
                   help="with a compile cache that lacks this setup's graphs, compile them in a child process "
                        "first and load them from the cache: the server keeps the compiler's leftovers out of "
                        "its memory (default on)")
    p.add_argument("--visual-cache-bytes", type=int, help="visual-token cache budget (default 256 MiB; 0 = off)")
    p.add_argument("--encoder-timeout-s", type=float, help="deadline of one Encode call (default 120)")
    p.add_argument("--encoder-retries", type=int, help="retries on another replica on UNAVAILABLE (default 2)")
    p.add_argument("--encoder-ready-timeout-s", type=float,
                   help="longest a call waits for an encoder replica to be SERVING before each retry; then "
                        "UNAVAILABLE (default 30)")
    p.add_argument("--max-new-tokens", type=int, help="when a request leaves it at 0 (default 256)")
    p.add_argument("--max-video-bytes", type=int,
                   help="largest video a Caption may carry; larger ones get INVALID_ARGUMENT before any encoder "
                        "sees them (default 64 MiB)")
    p.add_argument("--max-prompt-chars", type=int,
                   help="longest question a Caption may ask, in characters; longer ones get INVALID_ARGUMENT "
                        "(default 16384)")
    e = p.add_argument_group("TLS and tokens towards the encoders")
    e.add_argument("--encoder-tls-ca", metavar="FILE",
                   help="reach the encoders over TLS, trusting this CA (default: plaintext)")
    e.add_argument("--encoder-tls-cert", metavar="FILE",
                   help="client certificate for encoders that require one (with --encoder-tls-key)")
    e.add_argument("--encoder-tls-key", metavar="FILE", help="the PEM private key of --encoder-tls-cert")
    e.add_argument("--encoder-token-file", metavar="FILE",
                   help="send the first token in this file to the encoders (read again when it changes)")
    return p


async def serve(settings: DecoderSettings) -> None:
    servicer = DecoderServicer(settings)
    security = ServerSecurity.from_settings(settings)
    server, port, state = await create_server(format_address(settings.host, settings.port),
                                              [Service.pllava("Decoder", servicer)],
                                              registry=servicer.metrics.registry,
                                              max_message_bytes=max_message_bytes(settings.max_video_bytes),
                                              security=security,
                                              max_concurrent_rpcs=concurrent_rpc_limit(settings))
    await server.start()
    log.info("listening on %s", format_address(settings.host, port))
    log_security(security, servicer)
    exporter = None
    try:
        exporter = start_metrics_server(servicer.metrics.registry, settings.host, settings.metrics_port)
        await servicer.load()
    except BaseException:
        await server.stop(0)
        await servicer.close()
        if exporter is not None:
            exporter.close()
        raise

    async def shut_down() -> None:
        await servicer.close()
        if exporter is not None:
            exporter.close()

    freeze_startup_heap()
    await state.set_serving()
    log.info("serving; encoders at %s", settings.encoder)
    await serve_forever(server, state, settings.grace_s, on_shutdown=shut_down)


def log_security(security: ServerSecurity, servicer: DecoderServicer) -> None:
    """Say how clients reach this decoder and how it reaches the encoders."""
    log.info("clients: %s", security.describe())
    for warning in security.warnings():
        log.warning(warning)
    tls, token = servicer.encoder_tls, servicer.encoder_token
    log.info("encoders: %s, %s", "plaintext (no TLS)" if tls is None else
             "TLS" + (" with a client certificate" if tls.cert is not None else ""),
             f"bearer token from {token.path}" if token is not None else "no token")
    if token is not None and tls is None:
        log.warning("the encoder token travels unencrypted without TLS: set encoder_tls_ca unless the "
                    "network between the decoder and the encoders is private")


def main(argv: list[str] | None = None) -> int:
    return run_main("pllava-decoder", build_parser(), DecoderSettings, ENV_PREFIX, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
