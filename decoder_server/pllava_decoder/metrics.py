"""The decoder's Prometheus metrics, in the registry its server owns.

The engine loop records each engine step, the servicer each caption's first token and end,
and gauges read the engine loop and the visual-token cache when Prometheus scrapes (the
README's "Metrics" section lists every name). Without a server, a fresh registry of its own
keeps the objects usable and isolated.

Cache hits and misses carry the label ``input``: ``video`` for a video file sent whole,
``frames`` for frames the caller sampled and sent as images (cached by their content as well).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pllava.generation import StepTimes
from pllava_serving.metrics import INPUTS, LATENCY_BUCKETS, STEP_BUCKETS, ReadOnCollect

if TYPE_CHECKING:
    from .engine_loop import EngineLoop
    from .visual_cache import VisualCache


class DecoderMetrics:
    """Every metric of ``pllava-decoder`` (``pllava_decoder_*``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("pllava_decoder_queue_depth",
                                 "Captions admitted that have no token yet (their video being encoded, waiting "
                                 "for a slot, or their prompt being fed); max_queue of them are allowed", registry=r)
        self.running_sequences = Gauge("pllava_decoder_running_sequences",
                                       "Sequences past their prompt, generating one token per engine step",
                                       registry=r)
        self.kv_slots_in_use = Gauge("pllava_decoder_kv_slots_in_use",
                                     "KV-cache slots held by a sequence (decoding, or its prompt being prefilled)",
                                     registry=r)
        self.kv_slots = Gauge("pllava_decoder_kv_slots", "KV-cache slots in all (max_batch)", registry=r)
        self.kv_positions_in_use = Gauge("pllava_decoder_kv_positions_in_use",
                                         "KV-cache positions written across the held slots", registry=r)
        self.time_to_first_token = Histogram(
            "pllava_decoder_time_to_first_token_seconds",
            "Caption RPC start to its first generated token: video encode (or cache hit), queue and prefill",
            buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "pllava_decoder_time_per_output_token_seconds",
            "Per finished caption of two or more tokens: decode time after the first token / tokens after it",
            buckets=STEP_BUCKETS, registry=r)
        self.prefill_step = Histogram("pllava_decoder_prefill_step_seconds",
                                      "One prefill chunk of one prompt (model call and sampling)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.decode_step = Histogram("pllava_decoder_decode_step_seconds",
                                     "One batched decode step of every running sequence (model call and sampling)",
                                     buckets=STEP_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pllava_decoder_prompt_tokens",
                                     "Prompt positions prefilled (text and visual tokens)", registry=r)
        self.prompt_tokens_reused = Counter(
            "pllava_decoder_prompt_tokens_reused",
            "Leading prompt positions of finished captions found in the KV cache, not prefilled (reuse_prefixes)",
            registry=r)
        self.generated_tokens = Counter("pllava_decoder_generated_tokens",
                                        "Tokens generated (rate: the decoder's tokens per second)", registry=r)
        self.captions = Counter("pllava_decoder_captions", "Captions finished, by finish reason",
                                ("finish_reason",), registry=r)
        self.visual_token_bytes_received = Counter(
            "pllava_decoder_visual_token_bytes_received",
            "Bytes of visual-token tensors received from the encoders (as sent, before conversion)",
            registry=r)
        self.visual_cache_hits = Counter("pllava_decoder_visual_cache_hits",
                                         "Captions whose visual tokens came from the cache (no encoder call), "
                                         "by input: a video file (video) or frames sent as images (frames)",
                                         ("input",), registry=r)
        self.visual_cache_misses = Counter("pllava_decoder_visual_cache_misses",
                                           "Cache look-ups that found nothing (the video or frames went to an "
                                           "encoder), by input", ("input",), registry=r)
        for input_kind in INPUTS:  # both series exist from the start, at 0
            self.visual_cache_hits.labels(input_kind)
            self.visual_cache_misses.labels(input_kind)
        self.encoder_calls = Counter("pllava_decoder_encoder_calls",
                                     "Encode calls to the encoders, by how they ended (a gRPC code name; INTERNAL "
                                     "for an answer that made no sense, CANCELLED when the caption went away)",
                                     ("grpc_code",), registry=r)
        self.encoder_retries = Counter("pllava_decoder_encoder_retries",
                                       "Encode attempts made again on another replica after one was unavailable",
                                       registry=r)
        self.encoder_call_seconds = Histogram("pllava_decoder_encoder_call_seconds",
                                              "Time of one Encode call, retries and the wait for a ready replica "
                                              "included", buckets=LATENCY_BUCKETS, registry=r)
        self._cache_reader = ReadOnCollect(r)

    # ---- wiring ---------------------------------------------------------------------------
    def watch(self, loop: "EngineLoop") -> None:
        """Read the engine loop's queue and slots at scrape time."""
        engine = loop.engine
        self.queue_depth.set_function(lambda: loop.num_waiting)
        self.running_sequences.set_function(lambda: engine.num_decoding)
        self.kv_slots_in_use.set_function(lambda: engine.num_running)
        self.kv_slots.set_function(lambda: engine.num_slots)
        self.kv_positions_in_use.set_function(lambda: engine.kv_positions_in_use)

    def watch_cache(self, cache: "VisualCache") -> None:
        """Read the visual-token cache's size at scrape time."""
        add = self._cache_reader.add
        add("gauge", "pllava_decoder_visual_cache_bytes", "Bytes of visual tokens held in the cache",
            lambda: cache.nbytes)
        add("gauge", "pllava_decoder_visual_cache_entries", "Videos whose visual tokens the cache holds",
            lambda: len(cache))

    # ---- recording ------------------------------------------------------------------------
    def record_step(self, step: StepTimes, generated_tokens: int) -> None:
        """One engine step that produced ``generated_tokens`` (called on the engine thread;
        the warm-up request's steps count too)."""
        self.generated_tokens.inc(generated_tokens)
        if step.prefill_tokens or step.prefill_part:  # (each part of a chunk run in parts is a step)
            self.prefill_step.observe(step.prefill_s)
            self.prompt_tokens.inc(step.prefill_tokens)
        if step.decode_batch:
            self.decode_step.observe(step.decode_s)

    def record_cache_lookup(self, input_kind: str, hit: bool) -> None:
        """One visual-cache look-up for a request that carried ``input_kind``."""
        (self.visual_cache_hits if hit else self.visual_cache_misses).labels(input_kind).inc()

    def record_encoder_call(self, outcome: str, attempts: int, seconds: float) -> None:
        """One Encode call that ended with ``outcome`` after ``attempts`` attempts (the
        EncoderClient's ``on_call``)."""
        self.encoder_calls.labels(outcome).inc()
        self.encoder_retries.inc(max(0, attempts - 1))
        self.encoder_call_seconds.observe(seconds)

    def record_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def record_caption(self, finish_reason: str, generated: int, decode_s: float, reused: int = 0) -> None:
        """A caption that ended with ``generated`` tokens, ``decode_s`` after its first, its
        prompt's first ``reused`` positions found in the cache."""
        self.captions.labels(finish_reason).inc()
        self.prompt_tokens_reused.inc(reused)
        if generated >= 2 and decode_s > 0:
            self.time_per_output_token.observe(decode_s / (generated - 1))
