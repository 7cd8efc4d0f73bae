"""Sampling, stop strings and the batching engine on the tiny checkpoint."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from engine_runs import visual
from pllava.config import PllavaConfig
from pllava.generation import (ContextOverflowError, Engine, FinishReason, Request, SequenceError,
                               StopStringFilter, generate)
from pllava.model import PllavaLanguage
from pllava.pacing import AdmissionPacer
from pllava.prompt import build_prompt
from pllava.sampling import (BadLogits, Sampler, SamplingParams, apply_repetition_penalty, top_k_filter,
                             top_p_filter)
from pllava.shapes import short_only
from pllava.tokenizer import Tokenizer


# ---- sampling ----------------------------------------------------------------------------------
def test_filters_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(200).astype(np.float32) * 3
    seen = rng.integers(0, 200, 30)
    ids = torch.from_numpy(seen)[None]
    t = torch.from_numpy(logits)[None]
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(ids, t.clone())[0].numpy(), rtol=1e-6)
    ref_k = TopKLogitsWarper(7)(ids, t.clone())[0].numpy()
    np.testing.assert_array_equal(np.isfinite(top_k_filter(logits, 7)), np.isfinite(ref_k))
    for p in (0.1, 0.5, 0.9):
        ref_p = TopPLogitsWarper(p)(ids, t.clone())[0].numpy()
        np.testing.assert_array_equal(np.isfinite(top_p_filter(logits, p)), np.isfinite(ref_p), err_msg=str(p))


def test_top_p_over_a_real_vocabulary_keeps_what_a_full_sort_keeps():
    """Over 32064 logits only the head of the distribution is sorted: the kept tokens are those
    of transformers' warper (no ties) and of a stable sort of the whole vocabulary (ties: the
    lowest ids first), peaked, flat, tied and partly -inf alike."""
    from transformers.generation.logits_process import TopPLogitsWarper

    def full_sort(logits, top_p):
        order = np.argsort(-logits, kind="stable")
        probs = np.exp(logits[order] - logits[order][0])
        probs /= probs.sum()
        kept = order[np.cumsum(probs) - probs < top_p]
        return np.isin(np.arange(len(logits)), kept)

    rng = np.random.default_rng(5)
    for case in range(60):
        logits = rng.standard_normal(32064) * (0.5, 1, 2, 4, 12)[case % 5]
        if case % 3 == 1:
            logits = np.round(logits, 1)  # many ties
        if case % 4 == 2:
            logits[rng.random(32064) < 0.7] = -np.inf  # what top-k leaves
        for top_p in (0.05, 0.5, 0.9, 0.999):
            kept = np.isfinite(top_p_filter(logits, top_p))
            np.testing.assert_array_equal(kept, full_sort(logits, top_p), err_msg=f"case {case}, top_p {top_p}")
            if case % 3 != 1:
                hf = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)[None])[0].numpy()
                np.testing.assert_array_equal(kept, np.isfinite(hf), err_msg=f"case {case}, top_p {top_p}")


def test_sampler_greedy_seeded_and_reproducible():
    logits = np.random.default_rng(1).standard_normal(50).astype(np.float32)
    assert Sampler(SamplingParams())(logits, np.array([])) == int(logits.argmax())
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=3))(logits, np.array([])) == int(logits.argmax())
    a = Sampler(SamplingParams(temperature=1.5, seed=7))
    b = Sampler(SamplingParams(temperature=1.5, seed=7))
    seq_a = [a(logits, np.array([])) for _ in range(20)]
    assert seq_a == [b(logits, np.array([])) for _ in range(20)]
    assert len(set(seq_a)) > 1  # really sampling
    c = Sampler(SamplingParams(temperature=1.5, seed=8))
    assert [c(logits, np.array([])) for _ in range(20)] != seq_a  # another seed, another draw


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
    *[(dict(temperature=v), "temperature must be a finite number") for v in (NAN, INF)],
    *[(dict(top_p=v), "top_p must be a finite number") for v in (NAN, INF, -INF)],
    *[(dict(repetition_penalty=v), "repetition_penalty must be a finite number") for v in (NAN, INF, -INF)],
    (dict(stop=("x",) * 17), "at most 16 stop strings, got 17"),
    *[(dict(seed=v), "seed must be an integer from 0") for v in (-1, 2**64, 1.5, True)],
    *[(kw, "temperature 0 .the default. decodes greedily: give a temperature > 0") for kw in (dict(top_p=0.9),
                                                                                          dict(top_k=40))],
    (dict(stop=("x" * 257,)), "at most 256 characters, got one of 257"),
])
def test_sampling_params_validate(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_extreme_but_finite_parameters_still_sample():
    """A temperature so small that logits / temperature overflows float32 (and float64)
    samples the argmax; a repetition penalty so small that a seen logit becomes +inf makes
    that token certain. Neither turns the probabilities into NaN."""
    logits = np.random.default_rng(3).standard_normal(50).astype(np.float32)
    for temperature in (1e-30, 1e-45, 1e-300, 5e-324):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=1))
        assert [sampler(logits, np.array([])) for _ in range(5)] == [int(logits.argmax())] * 5
    seen = np.array([7, 9])
    logits[[7, 9]] = [2.0, 3.0]
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1e-45, seed=2))
    assert {sampler(logits, seen) for _ in range(20)} <= {7, 9}
    sampler = Sampler(SamplingParams(temperature=0.7, repetition_penalty=1e30, top_p=0.5, seed=2))
    assert all(0 <= sampler(logits, seen) < 50 for _ in range(20))


def test_logits_no_token_can_come_from_are_the_models_fault():
    logits = np.zeros(10, np.float32)
    logits[3] = np.nan
    for params in (SamplingParams(), SamplingParams(temperature=1.0)):
        with pytest.raises(BadLogits, match="NaN logits"):
            Sampler(params)(logits, np.array([]))
    with pytest.raises(BadLogits, match="-inf"):
        Sampler(SamplingParams())(np.full(10, -np.inf, np.float32), np.array([]))


def test_stop_string_filter_holds_back_partial_matches():
    f = StopStringFilter(["END", "\n\n"])
    out = []
    for piece in ["The cat", " sat E", "N", "D and more"]:
        text, hit = f.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "The cat sat " and hit
    g = StopStringFilter(["END"])
    assert g.feed("abcE") == ("abc", False)
    assert g.feed("x") == ("Ex", False)
    assert g.flush() == ""


# ---- engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return PllavaConfig.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def language(tiny_model_dir, cfg):
    return PllavaLanguage.from_pretrained(tiny_model_dir, cfg, num_slots=3, max_len=1024)


@pytest.fixture(autouse=True)
def same_chunk_times_in_every_test(language):
    """The pacer writes the chunk times it measures into the language's table, which every
    engine over that language shares: restored after each test, so that no test's chunks
    follow times measured in another (a first call's compile included)."""
    saved = dict(language.graph_seconds)
    yield
    language.graph_seconds.clear()
    language.graph_seconds.update(saved)


def prompt_ids(tokenizer, question):
    return tokenizer.encode(build_prompt(question))


def run_alone(language, tokenizer, request):
    events = list(generate(Engine(language, tokenizer), request))
    return [e.token_id for e in events if e.token_id is not None], "".join(e.text for e in events), events[-1]


def test_streamed_text_equals_full_decode(language, tokenizer, cfg):
    tokens, text, final = run_alone(language, tokenizer, Request(prompt_ids(tokenizer, "Describe it."), visual(cfg, 0),
                                                                 SamplingParams(max_new_tokens=30)))
    assert len(tokens) == 30 and final.finish_reason == FinishReason.LENGTH
    assert text == tokenizer.decode(tokens)
    assert final.stats.prompt_tokens == len(prompt_ids(tokenizer, "Describe it.")) - 1 + cfg.num_visual_tokens


def test_a_caption_that_ends_at_its_first_token_has_ordered_timings(language, tokenizer, cfg):
    """The first token is stamped before it can end the sequence: its time lies between the
    prefill's start and the end (negative decode times were reported before)."""
    *_, final = run_alone(language, tokenizer, Request(prompt_ids(tokenizer, "Go."), visual(cfg, 5),
                                                       SamplingParams(max_new_tokens=1)))
    s = final.stats
    assert final.finish_reason == FinishReason.LENGTH and s.generated_tokens == 1
    assert s.added <= s.prefill_start < s.first_token <= s.finished


def test_concurrent_requests_equal_their_solo_results(language, tokenizer, cfg):
    """Continuous batching: three requests admitted on different steps share decode steps
    and each produces exactly what it produces alone (greedy and seeded sampling)."""
    requests = [
        Request(prompt_ids(tokenizer, "What happens?"), visual(cfg, 1), SamplingParams(max_new_tokens=60)),
        Request(prompt_ids(tokenizer, "Describe the video in details."), visual(cfg, 2), SamplingParams(max_new_tokens=20)),
        Request(prompt_ids(tokenizer, "Who is there?"), visual(cfg, 3),
                SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=11)),
    ]
    solo = [run_alone(language, tokenizer, r)[0] for r in requests]
    engine = Engine(language, tokenizer)
    # long chunks whatever this machine's timings: the later prompts enter within the first
    # one's 60 tokens (in parts, judged on a slow first step, they could take ~76 steps)
    engine.pacer = FixedTimes(language.plan, max_gap_steps=100)
    got = {r.request_id: [] for r in requests}
    engine.add(requests[0])
    steps = 0
    batch_sizes = []
    while engine.has_work():
        if steps == 2:
            engine.add(requests[1])
            engine.add(requests[2])
        events = engine.step()
        batch_sizes.append(engine.num_running)
        steps += 1
        for e in events:
            if e.token_id is not None:
                got[e.request_id].append(e.token_id)
    assert [got[r.request_id] for r in requests] == solo
    assert max(batch_sizes) == 3


def test_eos_and_stop_strings(language, tokenizer, cfg):
    req = lambda **kw: Request(prompt_ids(tokenizer, "Go."), visual(cfg, 4), SamplingParams(max_new_tokens=25, **kw))
    tokens, text, _ = run_alone(language, tokenizer, req())
    for end in (tokens[3], (10**9, tokens[3])):  # one id, or several (generation_config.json's list)
        events = list(generate(Engine(language, tokenizer, eos_token_id=end), req()))
        assert [e.token_id for e in events] == tokens[:4] and events[-1].finish_reason == FinishReason.STOP
    assert "".join(e.text for e in events) == tokenizer.decode(tokens[:3])
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and stop in text
    _, stopped, final = run_alone(language, tokenizer, req(stop=(stop,)))
    assert final.finish_reason == FinishReason.STOP_STRING
    assert stopped == text[: text.index(stop)]


def test_cancel_frees_the_slot(language, tokenizer, cfg):
    engine = Engine(language, tokenizer)
    reqs = [Request(prompt_ids(tokenizer, "x"), visual(cfg, i), SamplingParams(max_new_tokens=100)) for i in range(4)]
    for r in reqs:
        engine.add(r)
    started: set[str] = set()
    for _ in range(200):  # each prompt takes a few prefill chunks (short ones while others decode)
        started.update(e.request_id for e in engine.step())
        if len(started) == 3:
            break
    assert started == {r.request_id for r in reqs[:3]}
    assert engine.num_running == 3 and engine.num_waiting == 1
    engine.cancel(reqs[0].request_id)
    events = engine.step()
    assert any(e.request_id == reqs[0].request_id and e.finish_reason == FinishReason.CANCELLED for e in events)
    assert engine.num_running == 3 and engine.num_waiting == 0  # the freed slot went to the last one
    for _ in range(200):  # (as above: a few chunks, as short as 16 positions)
        if any(e.request_id == reqs[3].request_id for e in engine.step()):
            break
    else:
        raise AssertionError("the request admitted into the freed slot never produced a token")


def two_streams_decoding(engine: Engine, tokenizer, cfg):
    """Start two streams on ``engine`` until each has its first token; -> (them, a longer
    prompt to admit next, not yet added)."""
    running = [Request(prompt_ids(tokenizer, "x"), visual(cfg, i), SamplingParams(max_new_tokens=200)) for i in range(2)]
    for r in running:
        engine.add(r)
    started: set[str] = set()
    while len(started) < 2:
        started.update(e.request_id for e in engine.step())
    newcomer = Request(prompt_ids(tokenizer, "a longer question " * 3), visual(cfg, 9), SamplingParams(max_new_tokens=5))
    return running, newcomer


def merge_step(engine: Engine, running) -> None:
    """The step after a prompt is admitted beside decoding streams: it merges the prompt with
    its visual tokens and feeds no chunk (so no chunk's step waits on the merge too), and each
    stream gets its token."""
    ids = [e.request_id for e in engine.step()]
    assert sorted(ids) == sorted(r.request_id for r in running)
    assert engine.last_step.prefill_tokens == 0 and engine._prefilling.embeds is not None


def test_running_streams_get_a_token_every_step_while_a_prompt_is_admitted(tiny_model_dir, tokenizer, cfg):
    """Chunked prefill: a new prompt enters in short chunks (a wait of one decode step: each
    whole or in parts, a share of the layers per step), and each step still decodes one
    token for every running sequence."""
    # (room for the running streams' tokens while two prompts of ~850 positions enter in parts)
    language = PllavaLanguage.from_pretrained(tiny_model_dir, cfg, num_slots=3, max_len=2048)
    engine = Engine(language, tokenizer, max_gap_steps=1, reuse_prefixes=False)  # (every chunk counted)
    running, newcomer = two_streams_decoding(engine, tokenizer, cfg)
    engine.add(newcomer)
    chunks = language.plan.chunks(len(newcomer.prompt_ids) - 1 + cfg.num_visual_tokens, allow=short_only)
    assert len(chunks) >= 3
    fed = []
    for _ in range(len(chunks) * len(language.chunk_layer_parts)):
        ids = [e.request_id for e in engine.step()]
        assert sorted(r.request_id for r in running) == sorted(i for i in ids if i != newcomer.request_id)
        fed.append(engine.last_step.prefill_tokens)
        if newcomer.request_id in ids:  # its first token ends its prefill
            break
    assert [n for n in fed if n] == [c.length for c in chunks] and fed[-1]


def decode_rows_fed(language) -> list[int]:
    """Records the decode rows each mixed step of ``language`` carries (whole or in parts)."""
    fed = []
    for name in ("_mixed", "_mixed_part"):
        step = getattr(language, name)

        def recorded(*args, _step=step):
            fed.append(args[3].shape[0])  # (chunk rows, chunk positions, chunk slot, tokens, ...)
            return _step(*args)
        setattr(language, name, recorded)
    return fed


# two streams out of slot order (slot 3 holds 60 positions, slot 1 holds 100): the rows of
# every slot, in slot order; a lone stream: its own row alone
STREAMS = {"two streams": ([5, 9], [60, 100], [3, 1]), "a lone stream": ([5], [60], [3])}


@pytest.mark.parametrize("streams", STREAMS)
def test_a_chunk_and_decode_rows_in_one_step_equal_the_two_apart(tiny_model_dir, cfg, streams):
    """The mixed step (one prompt chunk and a decode row per running stream through the
    weights once) gives the logits, and leaves the cache, that the chunk and the decode step
    run one after the other do: at a full chunk and at a padded tail; at the batch of every
    slot and at a lone stream's, which carries its one row."""
    import mindspore as ms

    from pllava.shapes import Chunk

    apart, together = (PllavaLanguage.from_pretrained(tiny_model_dir, cfg, num_slots=4, max_len=512) for _ in "ab")
    assert together.mixed_sizes and min(together.mixed_sizes) == together.plan.prefill_small_chunk
    fed = decode_rows_fed(together)
    rng = np.random.default_rng(0)
    width = cfg.text.hidden_size
    first = ms.Tensor(rng.standard_normal((1, 100, width)).astype(np.float32) * 0.1)
    newcomer = ms.Tensor(rng.standard_normal((1, 70, width)).astype(np.float32) * 0.1)
    for lang in (apart, together):
        lang.prefill(1, first)
        lang.prefill(3, first[:, :60])
    tokens, positions, slots = (np.array(a, np.int32) for a in STREAMS[streams])
    for chunk in (Chunk(0, 32, 32, 512), Chunk(32, 38, 64, 512)):
        chunk_alone = apart.prefill_chunk(2, newcomer, chunk)
        decode_alone = apart.decode(tokens, positions, slots)
        chunk_mixed, decode_mixed = together.prefill_chunk_and_decode(2, newcomer, chunk, tokens, positions, slots)
        # (with the chunk's rows, the decode rows' projections may take the AMX tiles: the same
        # float32 products summed in another order, up to ~2e-5 apart on logits of ~10 on a
        # Xeon with AMX; a row swapped or a cache row missed moves them by ~1)
        np.testing.assert_allclose(chunk_mixed, chunk_alone, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(decode_mixed, decode_alone, rtol=1e-5, atol=1e-4)
        assert len(decode_mixed) == len(tokens)
        if len(tokens) > 1:
            assert np.abs(decode_mixed[0] - decode_mixed[1]).max() > 1e-3  # rows not swapped or shared
        tokens, positions = tokens + 1, positions + 1
    assert fed == [4 if len(tokens) > 1 else 1] * 2
    # the caches agree: the next decode of every slot, the newcomer's included
    step = (np.array([11, 7, 12], np.int32), np.array([100 + 2 * (len(tokens) > 1), 70, 62], np.int32),
            np.array([1, 2, 3], np.int32))
    np.testing.assert_allclose(together.decode(*step), apart.decode(*step), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("streams", STREAMS)
def test_a_chunk_in_parts_beside_decode_rows_equals_the_chunk_and_the_decode_steps_apart(tiny_model_dir, cfg,
                                                                                        streams):
    """A shortest chunk run in parts, each part a share of the layers beside a decode step of
    the streams: its logits after the last part, each part's decode logits and the cache are
    those of the chunk run whole and the decode steps run apart; at a full chunk and at a
    padded tail; beside every slot's rows and beside a lone stream's one row."""
    import mindspore as ms

    from pllava.shapes import Chunk

    apart, parts = (PllavaLanguage.from_pretrained(tiny_model_dir, cfg, num_slots=4, max_len=512) for _ in "ab")
    layers = cfg.text.num_hidden_layers
    assert layers >= 2 and parts.chunk_layer_parts == ((0, layers // 2), (layers // 2, layers))
    fed = decode_rows_fed(parts)
    size = min(parts.mixed_sizes)
    rng = np.random.default_rng(1)
    width = cfg.text.hidden_size
    first = ms.Tensor(rng.standard_normal((1, 100, width)).astype(np.float32) * 0.1)
    newcomer = ms.Tensor(rng.standard_normal((1, 2 * size - 5, width)).astype(np.float32) * 0.1)
    for lang in (apart, parts):
        lang.prefill(1, first)
        lang.prefill(3, first[:, :60])
    tokens, positions, slots = (np.array(a, np.int32) for a in STREAMS[streams])
    for chunk in (Chunk(0, size, size, 512), Chunk(size, size - 5, size, 512)):
        chunk_alone = apart.prefill_chunk(2, newcomer, chunk)
        hidden = None
        for part in range(2):
            decode_alone = apart.decode(tokens, positions, slots)
            hidden, chunk_logits, decode_part = parts.prefill_chunk_part_and_decode(2, newcomer, chunk, part, hidden,
                                                                                  tokens, positions, slots)
            np.testing.assert_allclose(decode_part, decode_alone, rtol=1e-5, atol=1e-4)
            assert len(decode_part) == len(tokens)
            if len(tokens) > 1:
                assert np.abs(decode_part[0] - decode_part[1]).max() > 1e-3  # rows not swapped or shared
            tokens, positions = tokens + 1, positions + 1
        assert chunk_logits is not None and hidden.shape == (1, size, width)
        np.testing.assert_allclose(chunk_logits, chunk_alone, rtol=1e-5, atol=1e-4)
    assert fed == [4 if len(tokens) > 1 else 1] * 4
    with pytest.raises(ValueError, match="no compiled step for part 2 of a 16-position chunk"):
        parts.prefill_chunk_part_and_decode(2, newcomer, Chunk(0, size, size, 512), 2, hidden, tokens, positions, slots)
    # the caches agree: the next decode of every slot, the newcomer's included
    step = (np.array([11, 7, 12], np.int32), np.array([100 + 4 * (len(tokens) > 1), 2 * size - 5, 64], np.int32),
            np.array([1, 2, 3], np.int32))
    np.testing.assert_allclose(parts.decode(*step), apart.decode(*step), rtol=1e-5, atol=1e-4)


class Unmixed:
    """The language model without its mixed steps: a chunk and the decode run apart."""

    mixed_sizes = ()

    def __init__(self, language):
        self._language = language

    def __getattr__(self, name):
        return getattr(self._language, name)


def test_streams_decode_in_the_steps_of_a_prompt_chunk_with_the_same_tokens(language, tokenizer, cfg):
    """While a prompt enters, each step is ONE model call with the running streams' rows,
    and every stream's tokens are those of an engine that runs the chunk and the decode apart."""
    requests = three_requests(tokenizer, cfg, marked=None)
    flaky = FlakyLanguage(language)
    # short chunks only while others decode (no long one apart whatever the measured times,
    # queued prompts or not)
    mixed = drive(Engine(flaky, tokenizer, max_gap_steps=1, queued_weight=0), requests)
    # the 2nd and 3rd prompts entered beside decoding streams (whole or in parts)
    assert flaky.mixed_calls + flaky.part_calls >= 2
    apart = drive(Engine(Unmixed(language), tokenizer, max_gap_steps=1, queued_weight=0), requests)
    assert {rid: v[0] for rid, v in mixed.items()} == {rid: v[0] for rid, v in apart.items()}


def test_a_prompt_enters_in_parts_where_its_shortest_chunk_is_judged_too_long(language, tokenizer, cfg):
    """A shortest chunk beside the decode rows judged longer than the wait (the pacer's fixed
    times: its step 1.5 s against a 1 s decode step, a wait of 1 step) runs in parts, one per
    step, each still with a token for every running stream; the tokens are those of an engine
    that runs each chunk and the decode apart."""
    requests = three_requests(tokenizer, cfg, marked=None)
    flaky = FlakyLanguage(language)
    engine = Engine(flaky, tokenizer, max_gap_steps=1, queued_weight=0)
    engine.pacer = FixedTimes(language.plan, max_gap_steps=1)
    parts = []
    engine_step = engine.step

    def step():
        events = engine_step()
        parts.append(engine.last_step.prefill_part)
        return events

    engine.step = step
    in_parts = drive(engine, requests)
    assert flaky.part_calls >= 4 and flaky.mixed_calls == 0  # the 2nd and 3rd prompts entered in parts
    assert "1, 2, 1, 2" in ", ".join(map(str, parts))
    apart = drive(Engine(Unmixed(language), tokenizer, max_gap_steps=1, queued_weight=0), requests)
    assert {rid: v[0] for rid, v in in_parts.items()} == {rid: v[0] for rid, v in apart.items()}


def test_a_failed_part_of_a_chunk_reruns_the_chunk_whole_apart(language, tokenizer, cfg):
    """The second part of a chunk beside two decode rows fails: the chunk runs again whole on
    its own (its first part's rows rewritten with the same values) and the decode apart; every
    token is that of an engine that never failed."""
    requests = three_requests(tokenizer, cfg, marked=None)
    clean = drive(Engine(Unmixed(language), tokenizer, max_gap_steps=1, queued_weight=0), requests)
    flaky = FlakyLanguage(language, fail_part=2)
    engine = Engine(flaky, tokenizer, max_gap_steps=1, queued_weight=0)
    engine.pacer = FixedTimes(language.plan, max_gap_steps=1)
    got = drive(engine, requests)
    assert flaky.fail_part is None and flaky.part_calls >= 3  # it failed once, then parts ran on
    assert {rid: v[0] for rid, v in got.items()} == {rid: v[0] for rid, v in clean.items()}


def test_a_failed_mixed_step_is_retried_apart_and_fails_only_its_part(language, tokenizer, cfg, caplog):
    """The mixed step of a prompt chunk and two decode rows fails; run apart again, the
    chunk succeeds and the decode fails: the two decoding streams end with ERROR, the prompt
    carries on and finishes, and the engine serves on."""
    requests = three_requests(tokenizer, cfg, marked=None)
    clean = drive(Engine(language, tokenizer), requests)
    flaky = FlakyLanguage(language, fail_mixed=2, in_parts=False)
    # short chunks only while others decode, whole: the 2nd prompt ends in a mixed step with one
    # decode row (a long chunk apart would put the 2 streams in a decode of their own before any
    # mixed step; chunks in parts would take steps enough for the 1st stream to end first)
    with caplog.at_level(logging.WARNING, logger="pllava.generation"):
        got = drive(Engine(flaky, tokenizer, max_gap_steps=1, queued_weight=0), requests)
    assert flaky.mixed_failures == 1 and flaky.fail_batch is None  # the mixed step failed, then its decode apart
    assert "a step of a prompt chunk and 2 decode rows failed" in caplog.text and "running them apart" in caplog.text
    for rid in ("r0", "r1"):
        assert got[rid][2].finish_reason == FinishReason.ERROR
        assert "while decoding the next token (shared by the 2 sequences" in str(got[rid][2].error)
    assert got["r2"][2].finish_reason == FinishReason.LENGTH and got["r2"][0] == clean["r2"][0]


def test_a_prompt_enters_in_long_chunks_when_their_time_fits_the_wait(tiny_model_dir, tokenizer, cfg):
    """Warm-up times every prefill graph; with a wait that every chunk fits, a prompt admitted
    while streams decode enters in the long chunks an idle engine would use: fewer steps, and
    still a token for every running stream at each of them."""
    language = PllavaLanguage.from_pretrained(tiny_model_dir, cfg, num_slots=3, max_len=1024)
    graphs = language.warm_up()
    assert set(language.graph_seconds) == {g for g in language.plan.graphs() if g[0] == "prefill"} and graphs > 4
    engine = Engine(language, tokenizer, max_gap_steps=1e6, reuse_prefixes=False)  # (every chunk counted)
    running, newcomer = two_streams_decoding(engine, tokenizer, cfg)
    length = len(newcomer.prompt_ids) - 1 + cfg.num_visual_tokens
    long_chunks = language.plan.chunks(length)
    assert len(long_chunks) < len(language.plan.chunks(length, allow=short_only))
    engine.add(newcomer)
    merge_step(engine, running)
    for step in range(1, len(long_chunks) + 1):
        ids = [e.request_id for e in engine.step()]
        assert sorted(r.request_id for r in running) == sorted(i for i in ids if i != newcomer.request_id)
        assert engine.last_step.prefill_tokens == long_chunks[step - 1].length
        assert (newcomer.request_id in ids) == (step == len(long_chunks))


class FixedTimes(AdmissionPacer):
    """A pacer whose times stay as given (every chunk 0.5 s, a decode step 1 s, the shortest
    chunk beside decode rows 1.5 s), so that what it allows depends on the wait alone, not on
    this machine's timings."""

    def __init__(self, plan, max_gap_steps: float):
        keys = [g for g in plan.graphs() if g[0] == "prefill"]
        mixed = {("mixed", plan.prefill_small_chunk, context, rows): 1.5
                 for context in plan.context_buckets for rows in range(1, plan.num_slots + 1)}
        super().__init__({**{k: 0.5 for k in keys}, **mixed}, max_gap_steps, untried_margin=1.0)

    def chunk_ran(self, *args, **kwargs):
        pass

    def step_ran(self, seconds, load=1.0):
        pass

    def step_at(self, load=None):
        return 1.0


class LoadRecorder(AdmissionPacer):
    """A pacer that records the loads the engine reports with its decode steps and asks at."""

    def __init__(self):
        super().__init__({})
        self.ran, self.asked = [], []

    def step_ran(self, seconds, load=1.0):
        self.ran.append(load)
        super().step_ran(seconds, load)

    def allows(self, size, context, with_decode=0, stretch=1.0, load=None):
        self.asked.append(load)
        return False


def test_the_pacer_hears_what_a_step_of_the_streams_decoding_reads(language, tokenizer, cfg):
    """Each decode step is reported with what it read (the weights and each stream's rows),
    and an admission asks at the load of the streams decoding then."""
    engine = Engine(language, tokenizer)
    engine.pacer = recorder = LoadRecorder()
    running, newcomer = two_streams_decoding(engine, tokenizer, cfg)
    positions = [s.position + 1 for s in engine._slots if s is not None]
    engine.step()
    assert recorder.ran[-1] == language.decode_cost.reads(positions)
    assert recorder.ran[-1] > language.decode_cost.reads(positions[:1])  # two streams read more than one
    engine.add(newcomer)
    merge_step(engine, running)
    positions = [s.position + 1 for s in engine._slots if s is not None and s.generated]
    recorder.asked.clear()
    engine.step()
    assert recorder.asked and set(recorder.asked) == {language.decode_cost.reads(positions)}


@pytest.mark.parametrize("max_gap_stretch, queued_weight, newcomers, long",
                         [(4.0, 4.0, 2, True), (1.0, 4.0, 2, False), (4.0, 0.0, 2, False), (4.0, 4.0, 1, False)])
def test_the_wait_stretches_while_prompts_queue_behind_the_entering_one(
        language, tokenizer, cfg, max_gap_stretch, queued_weight, newcomers, long):
    """One stream decodes while prompts wait, a slot free for each: a chunk and a step (1.5
    steps) exceed the wait of one step, but fit it stretched by one prompt queued behind the
    entering one (1 + 4 x 1 / 1, capped at 4): the first prompt enters in a long chunk, unless
    stretching is off (a stretch of 1 or a weight of 0) or it enters alone (then in shortest
    chunks, each in parts)."""
    engine = Engine(language, tokenizer, max_gap_steps=1, max_gap_stretch=max_gap_stretch,
                    queued_weight=queued_weight)
    engine.pacer = FixedTimes(language.plan, max_gap_steps=1)
    first = Request(prompt_ids(tokenizer, "x"), visual(cfg, 0), SamplingParams(max_new_tokens=50))
    engine.add(first)
    while not any(e.request_id == first.request_id for e in engine.step()):
        pass
    waiting = [Request(prompt_ids(tokenizer, "a longer question " * 3), visual(cfg, 5 + i),
                       SamplingParams(max_new_tokens=2)) for i in range(newcomers)]
    for r in waiting:
        engine.add(r)
    length = len(waiting[0].prompt_ids) - 1 + cfg.num_visual_tokens
    long_chunk, short_chunk = language.plan.next_chunk(0, length), language.plan.next_chunk(0, length, short_only)
    assert long_chunk.length > short_chunk.length
    merge_step(engine, [first])
    ids = [e.request_id for e in engine.step()]
    assert first.request_id in ids  # the running stream still got its token
    if long:
        assert engine.last_step.prefill_tokens == long_chunk.length
    else:  # the shortest chunk, and in parts: its step too is longer than the wait
        assert engine.last_step.prefill_part == 1 and engine.last_step.prefill_tokens == 0
        assert first.request_id in [e.request_id for e in engine.step()]
        assert engine.last_step.prefill_part == 2 and engine.last_step.prefill_tokens == short_chunk.length


def test_the_engine_refuses_stretch_settings_that_make_no_sense(language, tokenizer):
    with pytest.raises(ValueError, match=r"max_gap_stretch must be at least 1 \(1 = never longer\), got 0.5"):
        Engine(language, tokenizer, max_gap_stretch=0.5)
    with pytest.raises(ValueError, match=r"queued_weight must be at least 0 \(0 = never longer\), got nan"):
        Engine(language, tokenizer, queued_weight=float("nan"))


def test_each_step_reports_what_it_ran_and_the_slots_it_holds(language, tokenizer, cfg):
    """What the serving metrics read: the last step's prefill chunk and decode batch, and the
    sequences and cache positions held."""
    engine = Engine(language, tokenizer, reuse_prefixes=False)  # (every prompt position fed)
    assert (engine.last_step.prefill_tokens, engine.last_step.decode_batch) == (0, 0)
    first = Request(prompt_ids(tokenizer, "x"), visual(cfg, 0), SamplingParams(max_new_tokens=50))
    engine.add(first)
    length = len(first.prompt_ids) - 1 + cfg.num_visual_tokens
    fed = 0
    while not engine.num_decoding:
        engine.step()
        fed += engine.last_step.prefill_tokens
        assert engine.last_step.prefill_s > 0 and engine.num_running == 1
    assert fed == length  # every prompt position, chunk by chunk
    assert engine.last_step.decode_batch == 1 and engine.last_step.decode_s > 0  # the same step decodes it
    engine.step()
    step = engine.last_step
    assert (step.prefill_tokens, step.prefill_s, step.decode_batch) == (0, 0.0, 1)
    assert engine.kv_positions_in_use == length + 2  # the prompt and two fed tokens
    second = Request(prompt_ids(tokenizer, "y"), visual(cfg, 1), SamplingParams(max_new_tokens=50))
    engine.add(second)
    merge_step(engine, [first])
    engine.step()
    assert engine.num_running == 2 and engine.num_decoding == 1  # one decoding, one prefilling
    assert engine.last_step.prefill_tokens > 0 and engine.last_step.decode_batch == 1
    engine.cancel(first.request_id)
    engine.cancel(second.request_id)
    engine.step()
    assert engine.num_running == engine.num_decoding == engine.kv_positions_in_use == 0


def test_prompt_longer_than_context_is_refused(language, tokenizer, cfg):
    long_question = "word " * 600
    with pytest.raises(ContextOverflowError, match="context holds 1024"):
        Engine(language, tokenizer).add(Request(prompt_ids(tokenizer, long_question), visual(cfg, 0)))


def test_an_empty_prompt_is_refused(language, tokenizer, cfg):
    """No position to take logits from: it sampled from a padding row's before."""
    empty_visual = np.zeros((0, cfg.text.hidden_size), np.float32)
    for request in (Request([], None), Request([cfg.image_token_index], empty_visual)):
        with pytest.raises(ValueError, match="the prompt is empty"):
            Engine(language, tokenizer).add(request)


def test_generation_stops_at_the_context_limit(tiny_model_dir, cfg, tokenizer, language):
    """Every cache position is used (the last token is never fed, so it needs none), and the
    tokens up to there are those of a longer cache."""
    small = PllavaLanguage.from_pretrained(tiny_model_dir, cfg, num_slots=1, max_len=896)
    ids = prompt_ids(tokenizer, "Hi.")
    prompt_len = len(ids) - 1 + cfg.num_visual_tokens
    tokens, _, final = run_alone(small, tokenizer, Request(ids, visual(cfg, 0), SamplingParams(max_new_tokens=500)))
    assert final.finish_reason == FinishReason.CONTEXT_LENGTH
    assert prompt_len + len(tokens) - 1 == 896
    longer, _, _ = run_alone(language, tokenizer, Request(ids, visual(cfg, 0), SamplingParams(max_new_tokens=len(tokens))))
    assert language.max_len > 896 and longer == tokens


# ---- one sequence's failure is its own -----------------------------------------------------------
class FailingSampler:
    """Wraps the real sampler of a request; raises on the ``fail_at``-th token of one marked
    request (seed 666), as a bug or a bad logit row in one sequence's sampling would."""

    MARK = 666

    def __init__(self, params: SamplingParams, fail_at: int = 5):
        self.inner = Sampler(params)
        self.fail = params.seed == self.MARK
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, logits, seen):
        self.calls += 1
        if self.fail and self.calls == self.fail_at:
            raise ValueError("probabilities contain NaN")
        return self.inner(logits, seen)


class FlakyLanguage:
    """The real language model, failing as a device would: the first decode call of
    ``fail_batch`` sequences raises, and so do the prefill calls listed in ``fail_prefill``
    (1-based) and the first call of part ``fail_part`` (1-based) of a chunk run in parts;
    without ``in_parts`` it runs no chunk in parts."""

    def __init__(self, language, fail_batch: int | None = None, fail_prefill=(), fail_part: int | None = None,
                 in_parts: bool = True, fail_mixed: int | None = None):
        self._language = language
        self.fail_batch, self.fail_prefill, self.fail_part = fail_batch, set(fail_prefill), fail_part
        self.fail_mixed = fail_mixed  # the first mixed step with this many decode rows fails, then its decode apart
        self.prefill_calls = self.mixed_calls = self.part_calls = self.mixed_failures = 0
        if not in_parts:  # every chunk beside decode rows whole
            self.chunk_layer_parts = ()
        self._failing = None  # (slot, chunk start) of a failed chunk step, until retried alone

    def __getattr__(self, name):
        return getattr(self._language, name)

    def decode(self, tokens, positions, slots):
        if len(tokens) == self.fail_batch:
            self.fail_batch = None
            raise RuntimeError("device lost during decode")
        return self._language.decode(tokens, positions, slots)

    def _prefill_fails(self, slot, chunk, retry: bool) -> bool:
        """A listed chunk fails, and so does the engine's retry of it on its own."""
        if retry and self._failing == (slot, chunk.start):
            self._failing = None
            return True
        self.prefill_calls += 1
        if self.prefill_calls in self.fail_prefill:
            self._failing = None if retry else (slot, chunk.start)
            return True
        return False

    def prefill_chunk(self, slot, embeds, chunk, *rest):
        if self._prefill_fails(slot, chunk, retry=True):
            raise RuntimeError("device lost during prefill")
        return self._language.prefill_chunk(slot, embeds, chunk, *rest)

    def prefill_chunk_and_decode(self, slot, embeds, chunk, tokens, positions, slots):
        self.mixed_calls += 1
        if self._prefill_fails(slot, chunk, retry=False):
            raise RuntimeError("device lost during prefill")
        if len(tokens) == self.fail_batch:
            raise RuntimeError("device lost during decode")  # fails again in decode(), run apart
        if len(tokens) == self.fail_mixed:
            self.fail_mixed, self.fail_batch = None, len(tokens)  # and again in decode(), run apart
            self.mixed_failures += 1
            raise RuntimeError("device lost during a mixed step")
        return self._language.prefill_chunk_and_decode(slot, embeds, chunk, tokens, positions, slots)

    def prefill_chunk_part_and_decode(self, slot, embeds, chunk, part, hidden, tokens, positions, slots):
        self.part_calls += 1
        if part == 0 and self._prefill_fails(slot, chunk, retry=False):
            raise RuntimeError("device lost during prefill")
        if len(tokens) == self.fail_batch:
            raise RuntimeError("device lost during decode")  # fails again in decode(), run apart
        if part + 1 == self.fail_part:
            self.fail_part = None
            raise RuntimeError("device lost during a part of a chunk")
        return self._language.prefill_chunk_part_and_decode(slot, embeds, chunk, part, hidden, tokens, positions, slots)


def drive(engine: Engine, requests, add_at=None) -> dict:
    """Step ``engine`` until idle; -> request id -> (token ids, text, final event)."""
    add_at = add_at or {0: requests}
    got = {r.request_id: ([], [], None) for r in requests}
    step = 0
    while step in add_at or engine.has_work():
        for r in add_at.get(step, ()):
            engine.add(r)
        for event in engine.step():
            tokens, text, _ = got[event.request_id]
            if event.token_id is not None:
                tokens.append(event.token_id)
            text.append(event.text)
            if event.finish_reason is not None:
                got[event.request_id] = (tokens, text, event)
        step += 1
    return {rid: (tokens, "".join(text), final) for rid, (tokens, text, final) in got.items()}


def three_requests(tokenizer, cfg, marked: int | None):
    seeds = [FailingSampler.MARK if i == marked else 100 + i for i in range(3)]
    return [Request(prompt_ids(tokenizer, q), visual(cfg, 20 + i),
                    SamplingParams(max_new_tokens=n, temperature=0.8, seed=seed), f"r{i}")
            for i, (q, n, seed) in enumerate(zip(["What happens?", "Describe it.", "Who is there?"],
                                                 [70, 60, 50], seeds))]  # all three decode together


def test_a_failing_sequence_ends_alone_and_the_others_are_unchanged(language, tokenizer, cfg):
    """The middle request's sampler raises on its 5th token: it ends with ERROR naming the
    stage and the cause, its slot is freed, and the other two produce exactly the tokens
    they produce when nothing fails."""
    clean = drive(Engine(language, tokenizer), three_requests(tokenizer, cfg, marked=None))
    engine = Engine(language, tokenizer, sampler=FailingSampler)
    got = drive(engine, three_requests(tokenizer, cfg, marked=1))
    tokens, text, final = got["r1"]
    assert final.finish_reason == FinishReason.ERROR and len(tokens) == 4 and final.token_id is None
    assert isinstance(final.error, SequenceError) and final.error.stage == "choosing the next token"
    assert str(final.error) == ("generation failed while choosing the next token: "
                                "ValueError: probabilities contain NaN")
    assert final.stats.generated_tokens == 4
    for rid in ("r0", "r2"):
        assert got[rid][0] == clean[rid][0] and got[rid][2].finish_reason == FinishReason.LENGTH
    assert engine.num_running == 0 and engine.num_waiting == 0
    with pytest.raises(SequenceError, match="probabilities contain NaN"):  # generate() raises it
        list(generate(engine, three_requests(tokenizer, cfg, marked=0)[0]))
    after = drive(engine, three_requests(tokenizer, cfg, marked=None))  # the engine serves on
    assert {rid: v[0] for rid, v in after.items()} == {rid: v[0] for rid, v in clean.items()}


def test_a_failed_decode_step_fails_its_batch_and_the_engine_keeps_serving(language, tokenizer, cfg):
    clean = drive(Engine(language, tokenizer), three_requests(tokenizer, cfg, marked=None))
    engine = Engine(FlakyLanguage(language, fail_batch=3), tokenizer)
    # long chunks whatever this machine's timings: the third prompt is in before the first two
    # streams end, so that a decode step of 3 rows comes (chunks in parts could take longer)
    engine.pacer = FixedTimes(language.plan, max_gap_steps=100)
    got = drive(engine, three_requests(tokenizer, cfg, marked=None))
    for rid, (tokens, _, final) in got.items():
        assert final.finish_reason == FinishReason.ERROR and tokens
        assert tokens == clean[rid][0][:len(tokens)]  # what came before the failure was right
        assert str(final.error).startswith("generation failed while decoding the next token (shared by the 3 "
                                           "sequences decoded together): RuntimeError: device lost during decode")
    assert engine.num_running == 0
    after = drive(engine, three_requests(tokenizer, cfg, marked=None))
    assert {rid: v[0] for rid, v in after.items()} == {rid: v[0] for rid, v in clean.items()}


def test_a_prompt_that_fails_to_merge_beside_decoding_streams_costs_them_no_token(language, tokenizer, cfg):
    """A prompt whose visual tokens cannot be merged (one column too wide) fails at the step
    that merges it beside the decoding streams: the same step still decodes a token for each
    of them and says so."""
    assert language.mixed_sizes  # (that step would run a chunk and the decode rows in one call)
    engine = Engine(language, tokenizer)
    running, _ = two_streams_decoding(engine, tokenizer, cfg)
    wide = np.zeros((cfg.num_visual_tokens, cfg.text.hidden_size + 1), np.float32)
    bad = Request(prompt_ids(tokenizer, "x"), wide, SamplingParams(max_new_tokens=5))
    engine.add(bad)
    for _ in range(10):  # (its leading text copied from a stream's slot first, a step a piece)
        events = engine.step()
        failed = [e for e in events if e.request_id == bad.request_id]
        if failed:
            break
        assert sorted(e.request_id for e in events) == sorted(r.request_id for r in running)
    assert len(failed) == 1 and failed[0].finish_reason == FinishReason.ERROR
    assert failed[0].error.stage == "merging the prompt with its visual tokens"
    assert sorted(e.request_id for e in events if e.token_id is not None) == sorted(r.request_id for r in running)
    assert (engine.last_step.decode_batch, engine.last_step.prefill_tokens) == (2, 0) and engine.last_step.decode_s > 0
    assert engine.num_running == 2


def test_a_failed_prefill_fails_only_its_own_prompt(language, tokenizer, cfg):
    """Two requests decode; a third's prefill chunk fails: the third ends with ERROR, the two
    running ones finish unchanged."""
    requests = three_requests(tokenizer, cfg, marked=None)
    clean = drive(Engine(language, tokenizer), requests)
    flaky = FlakyLanguage(language, in_parts=False)
    # short chunks only while others decode, queued prompts or not, and whole: the chunk count
    # must not follow measured times (chunks in parts, judged on measured steps, take more steps,
    # and a running stream that ends sooner lets the rest of a prompt enter in fewer, longer chunks)
    engine = Engine(flaky, tokenizer, max_gap_steps=1, queued_weight=0)
    engine.pacer = FixedTimes(language.plan, max_gap_steps=1)  # (times measured could let longer ones in)
    first = drive(engine, requests[:2])  # count the prefill chunks two prompts take
    flaky.fail_prefill = {flaky.prefill_calls * 2 + 1}  # the third prompt's first chunk in the next run
    got = drive(engine, requests, add_at={0: requests[:2], 8: requests[2:]})
    assert got["r2"][2].finish_reason == FinishReason.ERROR and got["r2"][0] == []
    assert "while prefilling the prompt: RuntimeError: device lost during prefill" in str(got["r2"][2].error)
    for rid in ("r0", "r1"):
        assert got[rid][0] == clean[rid][0] == first[rid][0]
    assert engine.num_running == 0
