"""The shape plan: chunks tile every prompt, and every shape a step can take is compiled at
warm-up (``graphs()``), so no request meets a compile."""
from __future__ import annotations

import pytest

from pllava.shapes import DecodeCost, ShapePlan, powers_of_two, short_only


def test_buckets_double_up_to_the_limits():
    plan = ShapePlan(num_slots=6, max_len=3000)
    assert plan.batch_buckets == (1, 6) and ShapePlan(2, 600).batch_buckets == (1, 2)
    assert ShapePlan(1, 600).batch_buckets == (1,)
    assert plan.context_buckets == (512, 1024, 2048, 3000)
    assert plan.batch_bucket(3) == 6 and plan.context_bucket(1025) == 2048 and plan.context_bucket(3000) == 3000
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        plan.context_bucket(3001)
    assert powers_of_two(64, 64) == (64,)


@pytest.mark.parametrize("plan", [ShapePlan(8, 4096), ShapePlan(2, 600, min_context=64, prefill_chunk=96),
                                  ShapePlan(1, 4096, prefill_area=64 * 1024)])
def test_chunks_tile_every_prompt_with_compiled_shapes(plan):
    compiled = {(size, context) for kind, size, context in plan.graphs() if kind == "prefill"}
    for length, busy in [(n, n % 2 == 0) for n in range(1, plan.max_len + 1, 7)]:
        chunks = plan.chunks(length, allow=short_only if busy else None)
        assert chunks[0].start == 0 and sum(c.length for c in chunks) == length
        if busy:  # others are decoding: short chunks only
            assert all(c.size <= plan.prefill_small_chunk for c in chunks)
        assert chunks[-1].size == plan.small_chunk_size(chunks[-1].context) or chunks[-1].length > plan.prefill_small_chunk
        for a, b in zip(chunks, chunks[1:]):
            assert b.start == a.start + a.length
        for c in chunks:
            assert 0 < c.length <= c.size and c.start + c.length <= c.context
            assert (c.size, c.context) in compiled
            assert c.size * c.context <= max(plan.prefill_area, plan.chunk_align * c.context)


def test_decode_shapes_are_all_compiled():
    plan = ShapePlan(8, 4096)
    compiled = {(size, context) for kind, size, context in plan.graphs() if kind == "decode"}
    for n in range(1, 9):
        for position in (0, 511, 512, 3000, 4095):
            assert (plan.batch_bucket(n), plan.context_bucket(position + 1)) in compiled


def test_short_prompt_tail_uses_a_short_chunk():
    plan = ShapePlan(8, 4096, prefill_small_chunk=32)
    assert [(c.length, c.size) for c in ShapePlan(8, 4096).chunks(296)] == [(256, 256), (16, 16), (16, 16), (8, 16)]
    assert [(c.length, c.size, c.context) for c in plan.chunks(296)] == [(256, 256, 512), (32, 32, 512),
                                                                          (8, 32, 512)]
    assert [(c.length, c.size) for c in plan.chunks(296, allow=short_only)][:2] == [(32, 32), (32, 32)]
    # a rest that short chunks would not feed for less goes in one long chunk
    assert [(c.length, c.size) for c in plan.chunks(400)] == [(256, 256), (144, 256)]


def test_while_others_decode_a_chunk_is_the_longest_allowed_size():
    """``allow`` (the engine's pacer) picks which long chunks may run; the short one always may."""
    plan = ShapePlan(8, 4096, prefill_small_chunk=32)
    assert plan.chunk_sizes(512) == (256, 32) and plan.chunk_sizes(4096) == (32,)
    allowed = {(128, 1024), (64, 2048)}  # say 256 at 512 takes too long, 128 at 1024 does not

    def allow(size, context):
        return (size, context) in allowed

    chunks = plan.chunks(2600, allow=allow)
    # positions below 1024 go in 128-token chunks at context 1024 (longer than 32 at 512)
    assert [(c.size, c.context) for c in chunks[:9]] == [(128, 1024)] * 8 + [(64, 2048)]
    assert {(c.size, c.context) for c in chunks[8:]} == {(64, 2048), (32, 4096)}
    assert sum(c.length for c in chunks) == 2600 and len(chunks) < len(plan.chunks(2600, allow=short_only))
    # a long chunk that is allowed is not taken when the rest fits short ones for less
    assert [(c.size, c.context) for c in plan.chunks(552, start=520, allow=allow)] == [(32, 1024)]


@pytest.mark.parametrize("plan", [ShapePlan(8, 4096, attention_in_place=True),
                                  ShapePlan(2, 600, min_context=64, prefill_chunk=96, attention_in_place=True)])
def test_in_place_every_size_serves_every_context(plan):
    """Chunks that read the cache in place: every compiled size at every context, a chunk may
    cross a bucket (its context is the bucket of its end) and takes the size that holds it."""
    sizes = plan.chunk_sizes(plan.context_buckets[0])
    assert all(plan.chunk_sizes(c) == sizes for c in plan.context_buckets)
    assert sizes[-1] == plan.prefill_small_chunk and sizes[0] == plan.prefill_chunk
    compiled = {(size, context) for kind, size, context in plan.graphs() if kind == "prefill"}
    assert compiled == {(s, c) for s in sizes for c in plan.context_buckets}
    for length, busy in [(n, n % 2 == 0) for n in range(1, plan.max_len + 1, 7)]:
        chunks = plan.chunks(length, allow=short_only if busy else None)
        assert chunks[0].start == 0 and sum(c.length for c in chunks) == length
        for a, b in zip(chunks, chunks[1:]):
            assert b.start == a.start + a.length
        for c in chunks:
            assert c.context == plan.context_bucket(c.start + c.length) and (c.size, c.context) in compiled
            assert c.size == min(s for s in sizes if s >= c.length)  # the least padding
            assert c.size <= (plan.prefill_small_chunk if busy else plan.prefill_chunk)


def test_in_place_a_chunk_is_the_longest_allowed_where_it_would_end():
    plan = ShapePlan(8, 4096, attention_in_place=True)
    assert [(c.length, c.size, c.context) for c in plan.chunks(310)] == [(256, 256, 512), (54, 64, 512)]

    def allow(size, context):  # say 128 may run up to context 2048, 64 anywhere
        return size == 64 or (size == 128 and context <= 2048)

    chunks = plan.chunks(2600, start=1800, allow=allow)
    # 1800 + 128 ends in the 2048 bucket: allowed; 1928 + 128 would end past it: 64s from there
    assert [(c.start, c.size, c.context) for c in chunks[:3]] == [(1800, 128, 2048), (1928, 64, 2048),
                                                                   (1992, 64, 4096)]
    assert {c.size for c in chunks[3:]} == {64, 32} and chunks[-1].length == 32


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        ShapePlan(1, 512, prefill_chunk=100)
    with pytest.raises(ValueError, match="at least 1 slot"):
        ShapePlan(0, 512)
    with pytest.raises(ValueError, match=r"small_chunk_parts must be at least 1 \(1 = whole chunks only\), got 0"):
        ShapePlan(1, 512, small_chunk_parts=0)


def test_a_chunk_in_parts_takes_consecutive_even_shares_of_the_layers():
    from pllava.model import layer_parts

    assert layer_parts(12, 2) == ((0, 6), (6, 12)) and layer_parts(12, 1) == ((0, 12),)
    assert layer_parts(5, 3) == ((0, 2), (2, 3), (3, 5))
    assert layer_parts(2, 4) == ((0, 1), (1, 2))  # at most one part a layer


def test_decode_splits_long_and_short_sequences_only_when_it_costs_less():
    plan = ShapePlan(8, 4096)
    # bytes read: 1 GB of weights, 0.1 MB per cached position attended over
    cost = DecodeCost.estimate(plan, 1e9, 1e5)
    assert cost.step(7, 300) == 1e9 + 8 * 512 * 1e5  # every slot, in place
    assert cost.step(1, 300) == 1e9 + 2 * 1 * 512 * 1e5  # gathered: counted twice
    # seven short streams and one 16-frame prompt: two steps read far less than one at 4096
    assert cost.best_split([300] * 7 + [2600]) == 7
    # all at one bucket, or a single sequence: nothing to split
    assert cost.best_split([300, 400, 500]) == 0 and cost.best_split([2600]) == 0
    # when the weights dominate, a second pass over them is not worth it
    assert DecodeCost.estimate(plan, 1e12, 1e5).best_split([300] * 7 + [2600]) == 0
    # among several splits the cheapest wins: the lone 16-frame sequence alone (gathered),
    # the rest in place at the 1024 bucket of their longest
    light = DecodeCost.estimate(plan, 1e8, 1e5)
    lengths = [300, 300, 300, 300, 300, 300, 1000, 3000]
    costs = {k: light.step(k, lengths[k - 1]) + light.step(8 - k, lengths[-1]) for k in range(1, 8)}
    assert min(costs, key=costs.get) == 7 and costs[7] < 0.9 * light.step(8, 3000)
    assert light.best_split(lengths) == 7
    # six long ones already read every slot in place: a split cannot read less
    assert light.best_split([300, 300] + [3000] * 6) == 0


def test_decode_never_splits_when_a_step_reads_only_live_rows():
    plan = ShapePlan(8, 4096)
    assert DecodeCost.estimate(plan, 1e8, 1e5).best_split([300] * 7 + [2600]) == 7
    assert DecodeCost.estimate(plan, 1e8, 1e5, live_rows=True).best_split([300] * 7 + [2600]) == 0


def test_a_decode_step_reads_the_weights_and_its_rows():
    plan = ShapePlan(8, 4096)
    live = DecodeCost.estimate(plan, 1e8, 1e5, live_rows=True)
    assert live.reads([300]) == 1e8 + 300 * 1e5
    assert live.reads([300, 700, 1]) == 1e8 + 1001 * 1e5  # each sequence's own positions
    bucketed = DecodeCost.estimate(plan, 1e8, 1e5)
    assert bucketed.reads([300, 700]) == bucketed.step(2, 700) == 1e8 + 8 * 1024 * 1e5  # its buckets' step
