"""The decoder's engine loop, visual cache and settings, without gRPC: continuous batching
keeps each request's tokens, cancellation frees the slot, a full queue refuses, the cache is
bounded, settings layer YAML < environment < flags."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from pllava.config import PllavaConfig
from pllava.generation import ContextOverflowError, Engine, FinishReason, Request
from pllava.model import PllavaLanguage
from pllava.prompt import build_prompt
from pllava.runtime import setup_backend
from pllava.sampling import Sampler, SamplingParams
from pllava.tokenizer import Tokenizer
from pllava_decoder.engine_loop import EngineLoop
from pllava_decoder.settings import ENV_PREFIX, DecoderSettings
from pllava_decoder.visual_cache import CachedVisual, VisualCache, visual_key
from pllava_serving.errors import InternalError, Overloaded
from pllava_serving.settings import load_settings

MAX_LEN = 1024


class Model:
    """The tiny checkpoint's language side and tokenizer, and a way to make requests."""

    def __init__(self, model_dir):
        self.dir = model_dir
        self.backend = setup_backend("CPU")
        self.cfg = PllavaConfig.from_pretrained(model_dir)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)

    def loop(self, slots: int, max_queue: int = 8, max_len: int = MAX_LEN, sampler=Sampler, **engine) -> EngineLoop:
        language = PllavaLanguage.from_pretrained(self.dir, self.cfg, self.backend, num_slots=slots,
                                                  max_len=max_len)
        return EngineLoop(Engine(language, self.tokenizer, sampler=sampler, **engine), max_queue=max_queue).start()

    def request(self, question: str, seed: int, max_new_tokens: int, rid: str) -> Request:
        ids = self.tokenizer.encode(build_prompt(question))
        visual = np.random.default_rng(seed).standard_normal(
            (self.cfg.num_visual_tokens, self.cfg.text.hidden_size)).astype(np.float32)
        return Request(ids, visual, SamplingParams(max_new_tokens=max_new_tokens), rid)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Model:
    return Model(tiny_model_dir)


async def collect(loop: EngineLoop, request: Request) -> tuple[list[int], str, FinishReason]:
    tokens, text, reason = [], "", None
    async with loop.submit(request) as stream:
        async for event in stream:
            if event.token_id is not None:
                tokens.append(event.token_id)
            text += event.text
            reason = event.finish_reason
    return tokens, text, reason


def test_concurrent_requests_equal_each_alone(model):
    # Prompts always enter in long chunks (no measured time keeps them short), so the later
    # prompts are in while the first stream still decodes, however loaded the machine is;
    # by measured timings, a slow step could leave each stream to finish before the next began.
    loop = model.loop(slots=4, max_gap_steps=1e6)
    try:
        specs = [("Describe the video in details.", 1, 24), ("What is the man cooking?", 2, 17),
                 ("List every object you see, one per line.", 3, 31)]

        async def alone():
            return [await collect(loop, model.request(q, s, n, f"alone-{i}")) for i, (q, s, n) in enumerate(specs)]

        async def together():
            return await asyncio.gather(*(collect(loop, model.request(q, s, n, f"together-{i}"))
                                          for i, (q, s, n) in enumerate(specs)))

        decoded = []  # the sequences each engine step decoded (read on the loop's thread, after each step)
        step = loop.engine.step

        def counted_step():
            events = step()
            decoded.append(loop.engine.last_step.decode_batch)
            return events

        loop.engine.step = counted_step
        singles = asyncio.run(alone())
        alone_most = max(decoded)
        decoded.clear()
        batched = asyncio.run(together())
    finally:
        loop.stop()
    for (q, _, n), single, both in zip(specs, singles, batched):
        assert single[2] == FinishReason.LENGTH and len(single[0]) == n, q
        assert both == single, q
    # Shared decode steps: together, the engine decoded several in one step.
    assert alone_most == 1 and max(decoded) >= 2, (alone_most, max(decoded))


def test_cancel_frees_the_slot(model):
    # A long context, so an uncancelled request would hold the only slot for ~3000 steps.
    loop = model.loop(slots=1, max_len=4096)
    long_tokens = 4096

    async def scenario():
        received = []
        stream = loop.submit(model.request("Describe the video in details.", 1, long_tokens, "long"))
        async for event in stream:
            received.append(event.token_id)
            if len(received) == 3:
                break
        stream.cancel()  # the client went away
        start_steps = loop.steps
        follow = await collect(loop, model.request("Who is there?", 2, 5, "follow"))

        # A task cancelled while it waits for its next token (a deadline) frees its slot too.
        started = asyncio.Event()

        async def consume():
            async with loop.submit(model.request("Describe it again.", 3, long_tokens, "deadline")) as s:
                async for _ in s:
                    started.set()
        task = asyncio.ensure_future(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = await collect(loop, model.request("And now?", 4, 5, "after"))
        return received, follow, after, loop.steps - start_steps

    try:
        received, follow, after, steps = asyncio.run(scenario())
    finally:
        loop.stop()
    assert len(received) == 3
    assert follow[2] == FinishReason.LENGTH and len(follow[0]) == 5
    assert after[2] == FinishReason.LENGTH and len(after[0]) == 5
    # With one slot, the follow-ups could only run once the long requests left it; had they
    # not been cancelled, each would have held it for about 3000 steps.
    assert steps < 1000, steps
    assert loop.engine.num_running == 0 and loop.engine.num_waiting == 0 and loop.num_waiting == 0


def failing_on_seed_666(params: SamplingParams):
    """The real sampler, except that a request seeded 666 fails on its 4th token."""
    sampler, calls = Sampler(params), [0]

    def choose(logits, seen):
        calls[0] += 1
        if params.seed == 666 and calls[0] == 4:
            raise FloatingPointError("probabilities contain NaN")
        return sampler(logits, seen)
    return choose


def test_a_failing_sequence_fails_its_own_stream_only(model):
    """Three captions decode together; one's sampling fails: its stream raises
    InternalError naming the cause, the other two finish with their usual tokens, and the
    loop serves the next request."""
    specs = [("Describe the video in details.", 1, 20), ("What is the man cooking?", 2, 16), ("Who?", 3, 12)]
    def requests(tag, marked):
        made = [model.request(q, seed, n, f"{tag}-{i}") for i, (q, seed, n) in enumerate(specs)]
        return [dataclasses.replace(r, params=dataclasses.replace(r.params, seed=666 if i == marked else None))
                for i, r in enumerate(made)]

    loop = model.loop(slots=4, sampler=failing_on_seed_666)

    async def outcome(request):
        try:
            return await collect(loop, request)
        except InternalError as exc:
            return exc

    async def run(tag, marked):
        return await asyncio.gather(*(outcome(r) for r in requests(tag, marked)))

    try:
        clean = asyncio.run(run("clean", None))
        mixed = asyncio.run(run("mixed", 1))
        after = asyncio.run(run("after", None))
    finally:
        loop.stop()
    assert isinstance(mixed[1], InternalError)
    assert str(mixed[1]) == ("generation failed while choosing the next token: "
                             "FloatingPointError: probabilities contain NaN")
    assert mixed[0] == clean[0] and mixed[2] == clean[2] and after == clean
    assert [r[2] for r in clean] == [FinishReason.LENGTH] * 3
    assert loop.engine.num_running == 0 and loop.num_waiting == 0


def test_a_request_added_as_the_engine_fails_is_not_left_decoding(model):
    """An engine-wide step failure cancels what the engine holds and fails every stream. A
    request whose stream was registered but which reached the engine only after that
    failure's cancel was applied got the error too, and then decoded on for nobody, holding
    its KV slot, until its token limit. Now its stream's error cancels it as well."""
    loop = model.loop(slots=2)
    engine, add = loop.engine, loop.engine.add

    def add_after_a_failure(request):
        if request.request_id == "late":  # the engine thread fails a step here, and steps on
            loop._fail_all(RuntimeError("injected step failure"))
            until_steps_or_idle(0)  # the cancels applied: "other" gone, "late"'s spent on nothing
        return add(request)

    def until_steps_or_idle(steps: int) -> None:
        seen, deadline = loop.steps, time.monotonic() + 60  # (the deadline only ends a hang)
        while engine.has_work() and (not steps or loop.steps < seen + steps) and time.monotonic() < deadline:
            time.sleep(0.001)

    engine.add = add_after_a_failure

    async def run():
        other = loop.submit(model.request("Describe it.", 1, 2000, "other"))
        await other.__anext__()  # decoding: the engine keeps stepping
        with pytest.raises(InternalError, match="injected step failure"):
            await collect(loop, model.request("Describe it.", 2, 3000, "late"))
        with pytest.raises(InternalError, match="injected step failure"):
            async for _ in other:
                pass

    try:
        asyncio.run(run())
        until_steps_or_idle(10)  # the stream's cancel applies at the next step; an orphan would step on
        assert engine.num_running == 0 and not engine.has_work()
    finally:
        loop.stop()


def test_full_queue_is_refused_and_context_overflow_raises(model):
    loop = model.loop(slots=1, max_queue=2)

    async def scenario():
        running = loop.submit(model.request("Describe the video in details.", 1, MAX_LEN, "running"))
        await running.__anext__()  # it holds the only slot now
        waiting = [loop.submit(model.request("Wait.", 2, 3, f"wait-{i}")) for i in range(2)]
        assert loop.num_waiting == 2
        with pytest.raises(Overloaded, match="max queue 2"):
            loop.admit()
        with pytest.raises(Overloaded):
            loop.submit(model.request("One too many.", 3, 3, "refused"))
        running.cancel()
        results = []
        for stream in waiting:
            async with stream:
                results.append([e async for e in stream])
        # The queue has room again; a prompt longer than the context is refused up front.
        huge = Request(list(range(5, 5 + MAX_LEN)), None, SamplingParams(), "huge")
        with pytest.raises(ContextOverflowError, match="context holds 1024"):
            loop.submit(huge)
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        loop.stop()
    assert [r[-1].finish_reason for r in results] == [FinishReason.LENGTH] * 2
    assert loop.num_waiting == 0 and loop.engine.num_waiting == 0


def test_idle_loop_does_not_spin(model):
    loop = model.loop(slots=1)
    try:
        asyncio.run(collect(loop, model.request("Hi.", 1, 2, "one")))
        steps = loop.steps
        asyncio.run(asyncio.sleep(0.3))
        assert loop.steps == steps  # asleep on its condition, not stepping an empty engine
    finally:
        loop.stop()
    assert not loop._thread.is_alive()


def test_visual_cache_is_lru_bounded_in_bytes():
    entry = lambda n: CachedVisual(np.zeros((n, 4), dtype=np.float32), 4)  # n * 16 bytes
    cache = VisualCache(max_bytes=100 * 16)
    keys = [visual_key(bytes([i]) * 10, 4, "m") for i in range(4)]
    assert keys[0] == visual_key(bytes([0]) * 10, 4, "m")
    assert keys[0] != visual_key(bytes([0]) * 10, 8, "m") != visual_key(bytes([0]) * 10, 4, "other")
    for key in keys[:3]:
        assert cache.put(key, entry(40))  # the third evicts the first: 120 > 100 entries' worth
    assert keys[0] not in cache and len(cache) == 2 and cache.nbytes == 80 * 16
    assert cache.get(keys[1]) is not None  # now keys[2] is the least recently used
    cache.put(keys[3], entry(40))
    assert keys[2] not in cache and keys[1] in cache and keys[3] in cache
    assert cache.get(keys[2]) is None and (cache.hits, cache.misses) == (1, 1)
    assert not cache.put(keys[0], entry(101))  # larger than the whole budget: not stored
    assert keys[1] in cache and cache.nbytes == 80 * 16
    cache.put(keys[1], entry(10))  # replacing an entry accounts for the old size
    assert cache.nbytes == 50 * 16
    disabled = VisualCache(0)
    assert not disabled.put(keys[0], entry(1)) and len(disabled) == 0


def test_decoder_settings_layers_and_checks(tmp_path):
    config = tmp_path / "decoder.yaml"
    config.write_text("model: /models/a\nmax_batch: 4\nencoder: dns:///encoder:50051\n")
    env = {f"{ENV_PREFIX}MAX_BATCH": "6", f"{ENV_PREFIX}VISUAL_CACHE_BYTES": "0"}
    s = load_settings(DecoderSettings, yaml_path=config, env_prefix=ENV_PREFIX, environ=env,
                      overrides={"max_batch": 2, "port": None})
    assert (s.model, s.encoder, s.max_batch, s.visual_cache_bytes, s.port) == (
        "/models/a", "dns:///encoder:50051", 2, 0, 50052)
    assert s.context_for(32768) == 4096 and s.context_for(2048) == 2048  # default: capped
    assert DecoderSettings(model="m", max_context=1024).context_for(4096) == 1024
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        DecoderSettings(model="m", max_context=8192).context_for(4096)
    with pytest.raises(ValueError, match="model is required"):
        DecoderSettings()
    with pytest.raises(ValueError, match="device must be one of.*max_batch must be >= 1"):
        DecoderSettings(model="m", max_batch=0, device="TPU")
    limits = load_settings(DecoderSettings, env_prefix=ENV_PREFIX, environ={
        f"{ENV_PREFIX}MODEL": "m", f"{ENV_PREFIX}MAX_VIDEO_BYTES": "1000", f"{ENV_PREFIX}MAX_PROMPT_CHARS": "80"})
    assert (limits.max_video_bytes, limits.max_prompt_chars) == (1000, 80)
    assert (DecoderSettings(model="m").max_video_bytes, DecoderSettings(model="m").max_prompt_chars) == (64 << 20,
                                                                                                       16384)
    with pytest.raises(ValueError, match="max_video_bytes must be >= 1.*max_prompt_chars must be >= 1"):
        DecoderSettings(model="m", max_video_bytes=0, max_prompt_chars=0)
    with pytest.raises(ValueError, match="encoder_timeout_s must be > 0, got nan"):
        DecoderSettings(model="m", encoder_timeout_s=float("nan"))
    paced = load_settings(DecoderSettings, env_prefix=ENV_PREFIX,
                          environ={f"{ENV_PREFIX}MODEL": "m", f"{ENV_PREFIX}MAX_GAP_STEPS": "3.5"})
    assert paced.max_gap_steps == 3.5 and DecoderSettings(model="m").max_gap_steps == 2.5
    assert DecoderSettings(model="m").prefill_small_chunk == 16
    assert DecoderSettings(model="m", prefill_chunk=48).prefill_chunk == 48
    with pytest.raises(ValueError, match="prefill_small_chunk must be a multiple of 16, got 40"):
        DecoderSettings(model="m", prefill_small_chunk=40)
    with pytest.raises(ValueError, match=r"max_gap_steps must be >= 1 \(1 = short chunks only\), got 0.5"):
        DecoderSettings(model="m", max_gap_steps=0.5)
    assert DecoderSettings(model="m").small_chunk_parts == 2
    assert DecoderSettings(model="m", small_chunk_parts=1).small_chunk_parts == 1
    with pytest.raises(ValueError, match=r"small_chunk_parts must be >= 1, got 0"):
        DecoderSettings(model="m", small_chunk_parts=0)
    assert DecoderSettings(model="m").max_gap_stretch == 4.0
    with pytest.raises(ValueError, match=r"max_gap_stretch must be >= 1 \(1 = never longer\), got nan"):
        DecoderSettings(model="m", max_gap_stretch=float("nan"))
    assert DecoderSettings(model="m").queued_weight == 4.0
    assert DecoderSettings(model="m", queued_weight=0).queued_weight == 0
    with pytest.raises(ValueError, match=r"queued_weight must be >= 0 \(0 = never longer\), got -1"):
        DecoderSettings(model="m", queued_weight=-1)


@pytest.mark.parametrize("parts, layer_parts", [(None, ((0, 1), (1, 2))), (1, ())])
def test_the_decoder_runs_a_shortest_chunk_in_the_parts_its_settings_say(tiny_model_dir, parts, layer_parts):
    """``small_chunk_parts`` reaches the language model the decoder loads (the tiny
    checkpoint's 2 layers: one a part by default, whole chunks only with 1)."""
    from pllava_decoder.server import LanguageModel

    fields = {"model": str(tiny_model_dir), "compile_cache": "", "max_batch": 2}
    if parts is not None:
        fields["small_chunk_parts"] = parts
    language = LanguageModel.load(DecoderSettings(**fields)).engine.language
    assert language.chunk_layer_parts == layer_parts and language.mixed_sizes
