"""Prompts that start alike: the cache rows of a prompt's leading text reused by a later
prompt, in the same slot or copied from another, with the same tokens as a full prefill."""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from engine_runs import run_batches, visual
from pllava import cpu_kernels
from pllava.config import PllavaConfig
from pllava.generation import PREFIX_COPY_PIECE, Engine, Request
from pllava.model import PllavaLanguage
from pllava.prefix_reuse import SlotPrefixes, common_length, leading_text
from pllava.prompt import build_prompt
from pllava.sampling import SamplingParams
from pllava.tokenizer import Tokenizer


def test_leading_text_stops_at_the_first_image_id():
    assert leading_text([1, 5, 9, 300, 4, 300], 300).tolist() == [1, 5, 9]
    assert leading_text([1, 5, 9], 300).tolist() == [1, 5, 9]  # no image: all of it
    assert leading_text([1, 300, 5], None).tolist() == [1, 300, 5]  # a text-only prompt
    assert leading_text([300, 5], 300).tolist() == []


def test_common_length():
    a = np.array([1, 2, 3, 4], np.int32)
    assert common_length(a, np.array([1, 2, 3, 4, 5], np.int32)) == 4
    assert common_length(a, np.array([1, 2, 7], np.int32)) == 2
    assert common_length(a, np.array([9], np.int32)) == 0
    assert common_length(a, np.zeros(0, np.int32)) == 0


def test_slot_prefixes_forget_what_is_written_over():
    p = SlotPrefixes(3)
    ids = np.arange(10, 20, dtype=np.int32)
    p.keep(1, ids, 8)  # only 8 of the 10 rows written so far
    assert p.reusable(1, ids) == 8 and p.reusable(0, ids) == 0
    assert p.reusable(1, np.array([10, 11, 99], np.int32)) == 2
    assert p.best(ids, [0, 1, 2]) == (1, 8)
    assert p.best(ids, [0, 2]) == (0, 0)  # the first of equals
    assert p.best(ids, []) == (-1, 0)
    p.written(1, -1)  # a padding row writes no row of the slot
    assert p.rows(1) == 8
    p.written(1, 12)  # past the rows: nothing lost
    assert p.rows(1) == 8
    p.written(1, 5)
    assert p.rows(1) == 5 and p.ids(1).tolist() == list(range(10, 15))
    p.keep(2, ids, 50)  # never more rows than ids
    assert p.rows(2) == 10
    p.forget()
    assert [p.rows(s) for s in range(3)] == [0, 0, 0]


def test_sources_send_the_slots_holding_the_same_text_to_one_of_them():
    p = SlotPrefixes(5)
    system = np.arange(100, 140, dtype=np.int32)
    p.keep(0, system, 40)
    p.keep(2, system, 40)
    p.keep(3, np.concatenate((system[:30], [7, 8, 9])), 33)  # 30 ids alike, then its own
    p.keep(4, system[:10], 10)  # too few alike to be worth it
    assert p.sources([0, 1, 2, 3, 4], limit=64) == [(0, 0), (1, 0), (0, 40), (0, 30), (4, 0)]
    assert p.sources([2, 3, 0], limit=32) == [(2, 0), (2, 30), (2, 32)]  # capped at the first block
    assert p.sources([3, 4], limit=64, least=8) == [(3, 0), (3, 10)]


def random_blocks(slots, kvh, block_rows, d, seed):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((slots * kvh * rows, d)).astype(np.float32),
             rng.standard_normal((slots * kvh * rows, d)).astype(np.float32)) for rows in block_rows]


@pytest.mark.parametrize("first, count", [(0, 0), (0, 3), (0, 4), (0, 9), (0, 12), (2, 9), (4, 7), (5, 12), (9, 9)])
def test_the_copy_kernel_copies_the_rows_asked_of_every_head_and_nothing_else(first, count):
    """Positions first..count-1 (the leading rows, or a piece of them), across blocks."""
    slots, kvh, d, block_rows = 3, 2, 16, (5, 4, 6)  # positions 0-3, 4-6, 7-11 (+ a spare row each)
    blocks = random_blocks(slots, kvh, block_rows, d, seed=count + 13 * first)
    expected = [(k.copy(), v.copy()) for k, v in blocks]
    src, dst = 2, 0
    start = 0
    for j, rows in enumerate(block_rows):
        lo, hi = max(first, start) - start, min(count, start + rows - 1) - start
        for h in range(kvh):
            for side in (0, 1):
                at = lambda slot: (slot * kvh + h) * rows  # noqa: E731
                if lo < hi:
                    expected[j][side][at(dst) + lo:at(dst) + hi] = blocks[j][side][at(src) + lo:at(src) + hi]
        start += rows - 1
    tensors = [Tensor(x) for pair in blocks for x in pair]
    op = cpu_kernels.copy_cache_rows_op()
    scalars = [Tensor(np.array([v], np.int32)) for v in (src, dst, first, count, kvh)]
    out = op(*scalars, Tensor(np.array(block_rows, np.int32)), *tensors).asnumpy()
    assert out.tolist() == [count]
    for (k, v), (tk, tv) in zip(expected, zip(tensors[::2], tensors[1::2])):
        np.testing.assert_array_equal(tk.asnumpy(), k)
        np.testing.assert_array_equal(tv.asnumpy(), v)


# ---- the language model and the engine -------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return PllavaConfig.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def language(tiny_model_dir, cfg):
    # small context blocks, so that the template's leading text crosses several
    return PllavaLanguage.from_pretrained(tiny_model_dir, cfg, num_slots=3, max_len=1024, min_context=64)


def caption_request(tokenizer, cfg, seed, question="Describe the video.", tokens=12):
    return Request(tokenizer.encode(build_prompt(question)), visual(cfg, seed), SamplingParams(max_new_tokens=tokens))


def run(engine, requests, together=False):
    """Each request's tokens and final stats; ``together``: all added at once (else one by one)."""
    tokens, stats = run_batches(engine, [requests] if together else [[r] for r in requests])
    return [tokens[r.request_id] for r in requests], [stats[r.request_id] for r in requests]


def test_the_template_text_is_prefilled_once_and_the_tokens_are_the_same(language, tokenizer, cfg):
    lead = len(leading_text(tokenizer.encode(build_prompt("Describe the video.")), cfg.image_token_index))
    assert lead > 2 * 64  # across context blocks
    questions = ["Describe the video.", "What happens?", "Describe the video."]
    requests = [caption_request(tokenizer, cfg, seed, q) for seed, q in enumerate(questions)]
    language.warm_up(timed=False)  # (forgets every slot)
    reused_tokens, reused = run(Engine(language, tokenizer), requests)
    language.warm_up(timed=False)
    fresh_tokens, fresh = run(Engine(language, tokenizer, reuse_prefixes=False), requests)
    assert reused_tokens == fresh_tokens
    assert [s.reused_tokens for s in fresh] == [0, 0, 0]
    assert [s.reused_tokens for s in reused] == [0, lead, lead]  # one at a time: the same slot again


def test_a_prompt_admitted_beside_a_running_one_gets_its_rows_copied(language, tokenizer, cfg):
    requests = [caption_request(tokenizer, cfg, seed, tokens=20) for seed in (5, 6, 7)]
    lead = len(leading_text(requests[0].prompt_ids, cfg.image_token_index))
    language.warm_up(timed=False)
    engine = Engine(language, tokenizer)
    together, stats = run(engine, requests, together=True)
    assert [s.reused_tokens for s in stats] == [0, lead, lead]  # copied: the other slots held nothing
    assert len({language.prefixes.rows(s) for s in range(3)}) == 1  # every slot now holds it
    language.warm_up(timed=False)
    alone, _ = run(Engine(language, tokenizer, reuse_prefixes=False), requests)
    assert together == alone
    # without reuse nothing is recorded, so no decode row read another slot's rows either
    assert [language.prefixes.rows(s) for s in range(3)] == [0, 0, 0]
    assert language._slot_rows(np.arange(3), [0, 1, 2]).asnumpy()[:, 2].tolist() == [0, 0, 0]


def admitted_beside_a_stream(engine, first, second, steps):
    """``second`` added once ``first`` decodes, then run to the end: each request's tokens,
    ``second``'s stats and, for each of the ``steps`` steps after it was added (each checked
    to give ``first`` a token), the positions it held and whether the step fed it a chunk or
    a part of one (the pacer, on this machine's times, may run the chunk in parts)."""
    tokens = {first.request_id: [], second.request_id: []}
    stats = {}

    def take(events):
        for e in events:
            if e.token_id is not None:
                tokens[e.request_id].append(e.token_id)
            if e.finish_reason is not None:
                stats[e.request_id] = e.stats
        return events

    engine.add(first)
    while not tokens[first.request_id]:
        take(engine.step())
    engine.add(second)
    held, chunked = [], []
    for _ in range(steps):
        events = take(engine.step())
        assert [e.request_id for e in events if e.token_id is not None] == [first.request_id]
        held.append(engine._prefilling.position)
        chunked.append(bool(engine.last_step.prefill_tokens or engine.last_step.prefill_part))
    while engine.has_work():
        take(engine.step())
    return [tokens[first.request_id], tokens[second.request_id]], stats[second.request_id], held, chunked


def test_beside_a_decoding_stream_the_rows_are_copied_a_piece_per_step(language, tokenizer, cfg):
    """While a stream decodes, a prompt's leading rows are copied in pieces of
    PREFIX_COPY_PIECE positions, as many per step as fit the wait allowed less a decode step
    (none here: one piece per step), each step still a token for the stream; the copy's
    last step feeds no chunk besides (the stream waited on the copy), nor does the next (it
    merges the prompt), the one after does; the tokens are those of no reuse."""
    requests = [caption_request(tokenizer, cfg, seed, tokens=30) for seed in (5, 6)]
    lead = len(leading_text(requests[1].prompt_ids, cfg.image_token_index))
    pieces = -(-lead // PREFIX_COPY_PIECE)
    assert pieces >= 3
    language.warm_up(timed=False)
    engine = Engine(language, tokenizer, max_gap_steps=1)  # a wait of one step allowed: no time for more
    tokens, stats, held, chunked = admitted_beside_a_stream(engine, *requests, steps=pieces + 2)
    assert held[:-3] == [PREFIX_COPY_PIECE * (k + 1) for k in range(pieces - 1)]
    assert held[-3] == held[-2] == lead and chunked == [False] * (pieces + 1) + [True]
    assert stats.reused_tokens == lead
    language.warm_up(timed=False)
    assert tokens == run(Engine(language, tokenizer, reuse_prefixes=False), requests)[0]


def test_a_copy_that_fails_leaves_the_rest_of_the_prompt_to_be_prefilled(language, tokenizer, cfg, monkeypatch,
                                                                        caplog):
    requests = [caption_request(tokenizer, cfg, seed, tokens=30) for seed in (5, 6)]
    language.warm_up(timed=False)
    real, calls = language.copy_prefix, []

    def second_piece_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("no memory for the copy")
        return real(*args, **kwargs)

    monkeypatch.setattr(language, "copy_prefix", second_piece_fails)
    engine = Engine(language, tokenizer, max_gap_steps=1)
    with caplog.at_level("WARNING", logger="pllava.generation"):
        tokens, stats, held, chunked = admitted_beside_a_stream(engine, *requests, steps=4)
    assert len(calls) == 2 and held[:3] == [PREFIX_COPY_PIECE] * 3  # no piece more: its chunks follow
    assert chunked == [False, False, False, True]
    assert stats.reused_tokens == PREFIX_COPY_PIECE
    assert "no memory for the copy" in caplog.text and "prefilling them" in caplog.text
    monkeypatch.undo()
    language.warm_up(timed=False)
    assert tokens == run(Engine(language, tokenizer, reuse_prefixes=False), requests)[0]


def test_streams_holding_the_same_text_read_it_from_one_slot_with_the_same_logits(language, tokenizer, cfg):
    """After prompts that start alike entered together (rows copied), a decode step of all
    three reads the shared text from the first slot, with the logits of each stream reading
    its own rows."""
    # (enough tokens that the first stream still decodes while the third prompt's rows are copied)
    requests = [caption_request(tokenizer, cfg, seed, tokens=20) for seed in (1, 2, 3)]
    language.warm_up(timed=False)
    run(Engine(language, tokenizer), requests, together=True)
    lead = len(leading_text(requests[0].prompt_ids, cfg.image_token_index))
    assert [language.prefixes.rows(s) for s in range(3)] == [lead] * 3
    rows = language._slot_rows(np.arange(3), [0, 1, 2]).asnumpy()
    assert rows.tolist() == [[0, 0, 0], [1, 0, lead], [2, 0, lead]]
    tokens, slots = np.array([5, 9, 11], np.int32), np.arange(3, dtype=np.int32)
    positions = np.array([700, 710, 720], np.int32)  # past every prompt: rows no one reads later
    shared = language.decode(tokens, positions, slots)
    language.share_prefixes = False
    try:
        assert language._slot_rows(np.arange(3), [0, 1, 2]).asnumpy()[:, 2].tolist() == [0, 0, 0]
        apart = language.decode(tokens, positions, slots)
    finally:
        language.share_prefixes = True
    np.testing.assert_allclose(shared, apart, rtol=1e-5, atol=1e-4)  # the sums split elsewhere: rounding


def test_every_write_forgets_the_rows_it_reaches(language, tokenizer, cfg):
    request = caption_request(tokenizer, cfg, 1, tokens=3)
    language.warm_up(timed=False)
    run(Engine(language, tokenizer), [request])
    lead = len(leading_text(request.prompt_ids, cfg.image_token_index))
    slot = next(s for s in range(3) if language.prefixes.rows(s))
    assert language.prefixes.rows(slot) == lead
    language.decode(np.array([5]), np.array([100]), np.array([slot]))  # (a caller writing outside the engine)
    assert language.prefixes.rows(slot) == 100
    assert language.copy_prefix(slot, (slot + 1) % 3, 1000) == 100  # at most what the source holds
    assert language.prefixes.rows((slot + 1) % 3) == 100
    embeds = language.merge_embeddings(request.prompt_ids, request.visual)
    language.prefill(slot, embeds)
    assert language.prefixes.rows(slot) == 0
    with pytest.raises(ValueError, match="slot 3 is outside the cache's 3 slots"):
        language.copy_prefix(0, 3, 10)
    language.warm_up(timed=False)
    assert [language.prefixes.rows(s) for s in range(3)] == [0, 0, 0]


def test_without_the_kernels_a_slot_reuses_only_its_own_rows(monkeypatch, tiny_model_dir, tokenizer, cfg):
    monkeypatch.setenv("PLLAVA_CPU_KERNELS", "0")
    cpu_kernels.build_library.cache_clear()
    try:
        plain = PllavaLanguage.from_pretrained(tiny_model_dir, cfg, num_slots=2, max_len=1024, min_context=64)
    finally:
        monkeypatch.delenv("PLLAVA_CPU_KERNELS")
        cpu_kernels.build_library.cache_clear()
    assert not plain.copies_prefixes
    requests = [caption_request(tokenizer, cfg, seed, tokens=8) for seed in (2, 3)]
    lead = len(leading_text(requests[0].prompt_ids, cfg.image_token_index))
    together, stats = run(Engine(plain, tokenizer), requests, together=True)
    assert [s.reused_tokens for s in stats] == [0, 0]  # the second slot held nothing
    again, stats = run(Engine(plain, tokenizer), requests, together=True)
    assert [s.reused_tokens for s in stats] == [lead, lead]  # each slot its own rows
    assert again == together


def test_a_prompt_cancelled_mid_text_leaves_only_the_rows_it_wrote(language, tokenizer, cfg):
    first, second = (caption_request(tokenizer, cfg, seed, tokens=6) for seed in (8, 9))
    lead = len(leading_text(first.prompt_ids, cfg.image_token_index))
    language.warm_up(timed=False)
    engine = Engine(language, tokenizer)
    engine.add(first)
    engine.step()  # its first chunk
    fed = engine.last_step.prefill_tokens
    assert 0 < fed < lead
    engine.cancel(first.request_id)
    engine.step()
    assert not engine.has_work()
    tokens, stats = run(engine, [second])
    assert stats[0].reused_tokens == fed
    language.warm_up(timed=False)
    assert run(Engine(language, tokenizer, reuse_prefixes=False), [second])[0] == tokens
