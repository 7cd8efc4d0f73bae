"""The CPU kernels: they are built here (CI has a compiler, so the fast path is the
one tested), they match numpy references op by op, and a model prefilling and decoding through
them gives the logits of the same model on MindSpore's own ops."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mindspore import Tensor

import pllava.llama as llama_module
from pllava import cpu_kernels
from pllava.config import PllavaConfig
from pllava.layers import rope_tables
from pllava.model import PllavaLanguage


def block_row(block_rows, slot, head, kvh, position):
    """(block, row) of a position of (slot, kv head): blocks hold positions then a spare row."""
    start = 0
    for j, rows in enumerate(block_rows):
        if position < start + rows - 1:
            return j, (slot * kvh + head) * rows + position - start
        start += rows - 1
    raise AssertionError(f"position {position} is past the blocks")


def reference(q, positions, slots, scale, blocks, block_rows):
    """softmax(scale * q.k) . v over positions 0..pos of each row's slot, in float64 (blocks
    already hold the new keys and values)."""
    b, kvh, g, d = q.shape
    out = np.zeros((b, kvh, g, d))
    for i in range(b):
        for h in range(kvh):
            where = [block_row(block_rows, slots[i], h, kvh, p) for p in range(positions[i] + 1)]
            if not where:
                continue
            keys = np.stack([blocks[j][0][r] for j, r in where]).astype(np.float64)
            vals = np.stack([blocks[j][1][r] for j, r in where]).astype(np.float64)
            score = q[i, h].astype(np.float64) @ keys.T * scale
            prob = np.exp(score - score.max(-1, keepdims=True))
            out[i, h] = (prob / prob.sum(-1, keepdims=True)) @ vals
    return out


def test_the_kernel_is_built_on_this_machine():
    assert cpu_kernels.build_library() is not None, "no CPU kernel: is g++ installed?"
    assert cpu_kernels.decode_attention_op(4) is not None
    assert cpu_kernels.prefill_attention_op(4) is not None
    assert cpu_kernels.half_linear_op() is not None


def test_the_half_linear_kernel_runs_on_amx_tiles_where_the_cpu_has_them():
    """Calls of 64 rows or more take the tiles exactly where the CPU (and so -march=native)
    has AMX-BF16; the kernel's tests below then run them at 64 rows and more."""
    from pathlib import Path

    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    wanted = {"amx_tile", "amx_bf16"} <= set(flags) and os.environ.get("PLLAVA_AMX") != "0"
    assert cpu_kernels.half_linear_tiles() == wanted
    ns = cpu_kernels.tile_product_ns(4000)  # the benchmark's probe of the tiles: there exactly with them
    assert (ns is not None and ns > 0) == wanted


def test_the_vector_loop_runs_many_rows_too_when_the_tiles_are_ruled_out(tmp_path):
    """PLLAVA_AMX=0 (read once per process): the AVX-512 loop takes calls of any row count,
    with the same fp32 results (checked in a fresh process)."""
    script = tmp_path / "no_tiles.py"
    script.write_text(
        "import numpy as np, mindspore as ms\n"
        "from mindspore import Tensor\n"
        "from pllava import cpu_kernels\n"
        "from pllava.layers import pack_panels\n"
        "assert not cpu_kernels.half_linear_tiles() and cpu_kernels.tile_product_ns() is None\n"
        "rng = np.random.default_rng(3)\n"
        "x = rng.standard_normal((77, 96)).astype(np.float32)\n"
        "w = rng.standard_normal((70, 96)).astype(np.float16)\n"
        "out = cpu_kernels.half_linear_op()(Tensor(x), Tensor(pack_panels(w).astype(np.float32), ms.float16)).asnumpy()\n"
        "np.testing.assert_allclose(out[:, :70], x.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, str(script)], env={**os.environ, "PLLAVA_AMX": "0"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_the_half_linear_kernel_is_vector_code_where_the_cpu_has_avx512():
    """-march=native: the tiles are AVX-512 code exactly where the CPU has it; elsewhere the
    model keeps float32 weights (the kernel's tests below run whichever code was built)."""
    from pathlib import Path

    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    assert cpu_kernels.half_linear_vectorized() == ("avx512f" in flags.split())


def rope(x, positions, cos, sin):
    """RoPE (rotate-half) of x (..., D) at ``positions`` (x's leading shape, or broadcast to
    it), in float64: what the kernels apply to the queries and keys they are given."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1).astype(np.float64)
    at = np.maximum(positions, 0)
    return x.astype(np.float64) * cos[at] + rotated * sin[at]


def assert_blocks(tensors, expected_blocks):
    """The cache blocks as the kernel left them: the expected keys (rotated: to rounding) and
    values (copied: exactly), nothing else touched."""
    for (k, v), (tk, tv) in zip(expected_blocks, zip(tensors[::2], tensors[1::2])):
        np.testing.assert_allclose(tk.asnumpy(), k, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(tv.asnumpy(), v)


def random_decode_inputs(rng, batch, slots_total, kvh, group, block_rows, d):
    """A decode step's fused q/k/v rows, random cache blocks, their last position and the
    RoPE tables that cover it."""
    qkv = rng.standard_normal((batch, kvh * group + 2 * kvh, d)).astype(np.float32)
    blocks = [(rng.standard_normal((slots_total * kvh * r, d)).astype(np.float32),
               rng.standard_normal((slots_total * kvh * r, d)).astype(np.float32)) for r in block_rows]
    last = sum(r - 1 for r in block_rows) - 1
    return qkv, blocks, last, *rope_tables(d, last + 1, 10000.0)


def decode_written(qkv, blocks, positions, slots, cos, sin, kvh, group, block_rows):
    """The step's queries (rotated, (B, kvh, group, d)) and the blocks as the kernel should
    leave them: each row's rotated key and its value at its position (none at -1)."""
    heads = kvh * group
    q = rope(qkv[:, :heads], positions[:, None], cos, sin).reshape(len(qkv), kvh, group, qkv.shape[-1])
    k_new = rope(qkv[:, heads:heads + kvh], positions[:, None], cos, sin)
    written = [(k.copy(), v.copy()) for k, v in blocks]
    for i in range(len(qkv)):
        for h in range(kvh):
            if positions[i] >= 0:
                j, r = block_row(block_rows, slots[i], h, kvh, positions[i])
                written[j][0][r], written[j][1][r] = k_new[i, h], qkv[i, heads + kvh + h]
    return q, written


@pytest.mark.parametrize("batch, slots_total, kvh, group, block_rows, d", [
    (3, 4, 2, 2, (5, 9), 8),         # grouped-query heads, two blocks, some slots
    (4, 4, 3, 1, (17,), 8),          # every slot, one block
    (1, 2, 2, 4, (3, 4, 6), 8),      # one stream, three blocks
    # head widths of whole vectors: scores 16 positions at a time, sums in registers
    (3, 4, 2, 1, (40, 27), 64),      # runs of 16 and a partial one in each block
    (2, 3, 1, 2, (70,), 128),        # grouped-query heads, 8 vectors of values
    (2, 2, 2, 1, (18, 33, 9), 48),   # three vectors, three blocks
])
def test_decode_kernel_writes_the_new_rows_and_matches_a_reference(batch, slots_total, kvh, group, block_rows, d):
    rng = np.random.default_rng(batch + kvh)
    heads = kvh * group
    qkv, blocks, last, cos, sin = random_decode_inputs(rng, batch, slots_total, kvh, group, block_rows, d)
    positions = rng.integers(0, last + 1, batch).astype(np.int32)
    positions[0] = -1                    # a dummy row: writes nothing, gets zeros
    if batch > 1:
        positions[1] = last              # the last position of the last block
    slots = rng.permutation(slots_total)[:batch].astype(np.int32)
    q, expected_blocks = decode_written(qkv, blocks, positions, slots, cos, sin, kvh, group, block_rows)
    tensors = [Tensor(x) for pair in blocks for x in pair]
    op = cpu_kernels.decode_attention_op(heads)
    out = op(Tensor(qkv), Tensor(positions), Tensor(slots), Tensor(np.array([0.37], np.float32)),
             Tensor(np.array(block_rows, np.int32)), Tensor(cos), Tensor(sin), *tensors).asnumpy()
    assert_blocks(tensors, expected_blocks)
    ref = reference(q, positions, slots, 0.37, expected_blocks, block_rows)
    assert out.shape == (batch, heads, d)
    np.testing.assert_allclose(out.reshape(q.shape), ref, atol=2e-5, rtol=1e-4)
    assert not out[0].any()


@pytest.mark.parametrize("block_rows, shared", [((40, 27), (20, 39, 0)), ((12, 30), (11, 5, 11))])
def test_decode_rows_read_their_prefix_from_the_slot_given(block_rows, shared):
    """Slots as (slot, prefix slot, prefix rows): a row reads its positions below its prefix
    rows (block 0) from the prefix slot and the rest from its own; equal to a reference over
    its own slot with those rows replaced by the prefix slot's. A prefix slot of its own or
    zero rows reads as the (B,) form does."""
    rng = np.random.default_rng(len(block_rows) + shared[0])
    batch, slots_total, kvh, group, d = 3, 4, 2, 2, 64
    heads = kvh * group
    qkv, blocks, last, cos, sin = random_decode_inputs(rng, batch, slots_total, kvh, group, block_rows, d)
    positions = np.array([last, block_rows[0] - 1, 30], np.int32)  # every one past its prefix rows
    slots = np.array([1, 3, 0], np.int32)
    prefix_slots = np.array([2, 2, 0], np.int32)  # two rows share slot 2's rows; the last its own
    table = np.stack([slots, prefix_slots, np.array(shared, np.int32)], 1)
    q, written = decode_written(qkv, blocks, positions, slots, cos, sin, kvh, group, block_rows)
    expected = np.zeros((batch, kvh, group, d))
    for i in range(batch):
        seen = [(k.copy(), v.copy()) for k, v in written]
        for h in range(kvh):
            own, src = (slots[i] * kvh + h) * block_rows[0], (prefix_slots[i] * kvh + h) * block_rows[0]
            for side in (0, 1):
                seen[0][side][own:own + shared[i]] = written[0][side][src:src + shared[i]]
        expected[i] = reference(q, positions, slots, 0.37, seen, block_rows)[i]
    tensors = [Tensor(x) for pair in blocks for x in pair]
    op = cpu_kernels.decode_attention_op(heads)
    args = (Tensor(np.array([0.37], np.float32)), Tensor(np.array(block_rows, np.int32)), Tensor(cos), Tensor(sin))
    out = op(Tensor(qkv), Tensor(positions), Tensor(table), *args, *tensors).asnumpy()
    assert_blocks(tensors, written)
    np.testing.assert_allclose(out.reshape(q.shape), expected, atol=2e-5, rtol=1e-4)
    own = reference(q, positions, slots, 0.37, written, block_rows)
    assert np.abs(out.reshape(q.shape)[0] - own[0]).max() > 1e-3  # the prefix slot was read, not its own
    np.testing.assert_allclose(out.reshape(q.shape)[2], own[2], atol=2e-5, rtol=1e-4)


def test_decode_prefix_rows_past_the_first_block_are_refused():
    batch, kvh, d, block_rows = 1, 1, 16, (5, 9)
    qkv = np.zeros((batch, 3 * kvh, d), np.float32)
    cos, sin = rope_tables(d, 16, 10000.0)
    blocks = [Tensor(np.zeros((2 * kvh * r, d), np.float32)) for r in block_rows for _ in range(2)]
    op = cpu_kernels.decode_attention_op(kvh)
    args = (Tensor(np.array([1.0], np.float32)), Tensor(np.array(block_rows, np.int32)), Tensor(cos), Tensor(sin))
    ok = op(Tensor(qkv), Tensor(np.array([8], np.int32)), Tensor(np.array([[0, 1, 4]], np.int32)), *args, *blocks)
    assert ok.asnumpy().shape == (1, 1, d)
    with pytest.raises(RuntimeError):
        op(Tensor(qkv), Tensor(np.array([8], np.int32)), Tensor(np.array([[0, 1, 5]], np.int32)), *args,
           *blocks).asnumpy()


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PLLAVA_CPU_KERNELS", "0")
    cpu_kernels.build_library.cache_clear()
    try:
        assert cpu_kernels.build_library() is None
        assert cpu_kernels.decode_attention_op(4) is None
        assert cpu_kernels.prefill_attention_op(4) is None
    finally:
        monkeypatch.delenv("PLLAVA_CPU_KERNELS")
        cpu_kernels.build_library.cache_clear()


@pytest.fixture(scope="module")
def cfg(hf_tiny_dir):
    return PllavaConfig.from_pretrained(hf_tiny_dir)


def decode_logits(language: PllavaLanguage, cfg) -> list[np.ndarray]:
    """Prefill three prompts (one past the first context block, so chunks read two blocks)
    into three of four slots, then decode a few steps of every subset the engine runs: all,
    one, and two. The logits of every prompt position, then of every step."""
    width = cfg.text.hidden_size
    rng = np.random.default_rng(0)
    lengths = {0: 40, 2: 90, 3: 7}
    out = []
    for slot, n in lengths.items():
        embeds = Tensor(rng.standard_normal((1, n, width)).astype(np.float32) * 0.5)
        out.append(language.prefill(slot, embeds, logit_index=range(n)))
    for step in range(3):
        for slots in ([0, 2, 3], [2], [3, 0]):
            positions = np.array([lengths[s] + step for s in slots])
            tokens = np.array([(7 * s + step) % 50 + 3 for s in slots])
            out.append(language.decode(tokens, positions, np.array(slots)))
    return out


@pytest.mark.parametrize("batch, length, kvh, group, d, block_rows, slots_total", [
    (1, 8, 2, 2, 16, (5, 9, 70), 3),    # grouped-query heads; a chunk across three blocks
    (2, 37, 3, 1, 32, (65, 130), 2),    # two sequences; more rows than one work item takes
    (1, 33, 2, 3, 48, (100,), 1),       # a head width of three vectors; partial row blocks
    (1, 70, 1, 16, 64, (200, 7), 2),    # many heads per kv head; several key tiles
    (1, 16, 2, 1, 64, (150, 80), 2),    # 16 rows: work items of one vector of rows; tiles across blocks
    (1, 40, 2, 2, 128, (150, 90), 2),   # LLaMA-7B's head width: whole tiles in one block, one across two
])
def test_prefill_kernel_writes_the_chunk_and_matches_a_reference(batch, length, kvh, group, d, block_rows,
                                                                 slots_total):
    rng = np.random.default_rng(length)
    heads = kvh * group
    qkv = rng.standard_normal((batch, length, heads + 2 * kvh, d)).astype(np.float32)
    blocks = [(rng.standard_normal((slots_total * kvh * r, d)).astype(np.float32),
               rng.standard_normal((slots_total * kvh * r, d)).astype(np.float32)) for r in block_rows]
    last = sum(r - 1 for r in block_rows) - 1
    cos, sin = rope_tables(d, last + 1, 10000.0)
    slots = rng.permutation(slots_total)[:batch].astype(np.int32)
    positions = np.zeros((batch, length), np.int32)
    for i in range(batch):
        start = rng.integers(0, last + 2 - length)
        positions[i] = np.arange(start, start + length)
        positions[i, length - 2:] = -1   # padding rows: write nothing, get zeros
    q = rope(qkv[:, :, :heads], positions[..., None], cos, sin)
    k_new = rope(qkv[:, :, heads:heads + kvh], positions[..., None], cos, sin)
    v_new = qkv[:, :, heads + kvh:]
    expected_blocks = [(k.copy(), v.copy()) for k, v in blocks]
    for i in range(batch):
        for l in range(length):
            for h in range(kvh):
                if positions[i, l] >= 0:
                    j, r = block_row(block_rows, slots[i], h, kvh, positions[i, l])
                    expected_blocks[j][0][r], expected_blocks[j][1][r] = k_new[i, l, h], v_new[i, l, h]
    tensors = [Tensor(x) for pair in blocks for x in pair]
    op = cpu_kernels.prefill_attention_op(heads)
    out = op(Tensor(qkv), Tensor(positions), Tensor(slots), Tensor(np.array([0.37], np.float32)),
             Tensor(np.array(block_rows, np.int32)), Tensor(cos), Tensor(sin), *tensors).asnumpy()
    assert_blocks(tensors, expected_blocks)
    # the decode reference, one query row at a time: (B*L, kvh, group, d)
    flat_q = q.reshape(batch * length, kvh, group, d)
    ref = reference(flat_q, positions.reshape(-1), np.repeat(slots, length), 0.37, expected_blocks, block_rows)
    assert out.shape == (batch, length, heads, d)
    np.testing.assert_allclose(out, ref.reshape(out.shape), atol=2e-5, rtol=1e-4)
    assert not out[:, length - 2:].any()


def test_prefill_and_decode_through_the_kernels_equal_mindspores_ops(hf_tiny_dir, cfg, monkeypatch):
    fast = PllavaLanguage.from_pretrained(hf_tiny_dir, cfg, num_slots=4, max_len=256, min_context=64)
    assert fast.lm.kernel_attention and fast.plan.attention_in_place
    monkeypatch.setattr(llama_module, "attention_kernels_for", lambda *args: (None, None))
    plain = PllavaLanguage.from_pretrained(hf_tiny_dir, cfg, num_slots=4, max_len=256, min_context=64)
    assert not plain.lm.kernel_attention and not plain.plan.attention_in_place
    # the kernels read each sequence's own positions: one decode graph per batch bucket, and
    # every chunk size at every context
    assert fast.decode_contexts == (256,) and plain.decode_contexts == plain.plan.context_buckets
    # and the kernels' cache is one block; MindSpore's ops read theirs up to a context bucket
    assert fast.lm.blocks == ((0, 256),) and plain.lm.blocks == ((0, 64), (64, 64), (128, 128))
    assert {g for g in fast.plan.graphs(fast.decode_contexts) if g[0] == "decode"} == {
        ("decode", 1, 256), ("decode", 4, 256)}
    assert all(fast.plan.chunk_sizes(c) == (256, 128, 64, 32, 16) for c in fast.plan.context_buckets)
    for ours, theirs in zip(decode_logits(fast, cfg), decode_logits(plain, cfg)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("rows, outs, width", [
    (1, 37, 64),    # one row; the last panel partly zeros
    (8, 64, 48),    # a decode batch, two panels
    (14, 32, 16),   # one full group of rows
    (45, 40, 24),   # four groups of 11-12 rows
    (17, 33, 32),   # two groups of 9 and 8 rows, not 14 and 3
    (40, 40, 32),   # a 32-position chunk beside 8 decode rows: the vector loop everywhere
    (63, 40, 24),   # the most rows the vector loop takes where there are AMX tiles
    (64, 40, 64),   # AMX tiles where there are any: two blocks of 32 rows
    (77, 70, 96),   # ... full blocks and a partial one, three panels
    (96, 64, 128),  # ... full blocks only
])
def test_half_linear_equals_an_fp32_matmul_over_the_stored_weights(half, rows, outs, width):
    import ml_dtypes
    import mindspore as ms

    from pllava.layers import pack_panels, unpack_panels

    rng = np.random.default_rng(rows * outs)
    x = rng.standard_normal((rows, width)).astype(np.float32)
    stored = rng.standard_normal((outs, width)).astype(np.float16 if half == "float16" else ml_dtypes.bfloat16)
    packed = pack_panels(stored)
    assert packed.shape == (-(-outs // 32), width, 32)
    np.testing.assert_array_equal(unpack_panels(packed, outs), stored)
    weight = Tensor(packed.astype(np.float32), dtype=getattr(ms, half))  # exact: the values fit
    out = cpu_kernels.half_linear_op()(Tensor(x), weight).asnumpy()
    assert out.dtype == np.float32 and out.shape == (rows, packed.shape[0] * 32)
    np.testing.assert_allclose(out[:, :outs], x.astype(np.float64) @ stored.astype(np.float64).T,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[:, outs:], 0)  # the padding columns


def test_calls_under_64_rows_stay_on_the_vector_loop():
    """A prompt chunk beside the streams' decode rows (here 40 rows) runs on the vector loop
    even where there are AMX tiles (on the tiles it ran 1.2-1.4x slower, and the streams wait
    on it): each row then comes out bit for bit as it does alone (the loop sums every row in
    the same order). At 64 rows, where the CPU has tiles, they take the call: their sums
    round differently."""
    import mindspore as ms

    from pllava.layers import pack_panels

    rng = np.random.default_rng(40)
    weight = Tensor(pack_panels(rng.standard_normal((96, 1024)).astype(np.float16)).astype(np.float32), ms.float16)
    op = cpu_kernels.half_linear_op()
    for rows in (40, 63, 64):
        x = rng.standard_normal((rows, 1024)).astype(np.float32)
        together = op(Tensor(x), weight).asnumpy()
        alone = np.concatenate([op(Tensor(x[i:i + 1]), weight).asnumpy() for i in range(rows)])
        if rows < 64 or not cpu_kernels.half_linear_tiles():
            np.testing.assert_array_equal(together, alone)
        else:
            assert not np.array_equal(together, alone)
            np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 48), (1, 300, 256)])  # decode, odd rows, threaded
def test_rms_norm_and_silu_mul_kernels_match_float64(shape):
    rng = np.random.default_rng(shape[1])
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    out = cpu_kernels.rms_norm_op()(Tensor(x), Tensor(w), Tensor(np.array([1e-5], np.float32))).asnumpy()
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert out.shape == x.shape
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-6)
    gate_up = (rng.standard_normal(shape[:-1] + (2 * shape[-1] + 2,)) * 6).astype(np.float32)  # a tail lane
    gate_up.reshape(-1)[:4] = [-100.0, 100.0, 0.0, -0.0]  # saturated both ways, and zero
    out = cpu_kernels.silu_mul_op()(Tensor(gate_up)).asnumpy()
    gate, up = np.split(gate_up.astype(np.float64), 2, -1)
    assert out.shape == up.shape
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 77, 3, 32), (1, 130, 2, 64)])  # one key; partial tiles
def test_full_attention_equals_softmax_attention(shape):
    """The vision tower's attention kernel: every query over every key of its frame."""
    rng = np.random.default_rng(sum(shape))
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    scale = np.float32(shape[-1] ** -0.5)
    out = cpu_kernels.full_attention_op()(Tensor(q), Tensor(k), Tensor(v), Tensor(np.array([scale]))).asnumpy()
    scores = np.einsum("nlhd,nmhd->nhlm", q.astype(np.float64), k.astype(np.float64)) * scale
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("nhlm,nmhd->nlhd", probs, v.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_the_vision_tower_runs_its_attention_through_the_kernel_where_heads_are_whole_vectors(tiny_model_dir, cfg):
    """The tiny PLLaVA's heads are 16 wide (the kernel's vectors); the transformers-made tiny
    LLaVA's 8: MindSpore's ops there (its parity tests cover that path)."""
    from pllava.model import PllavaVision

    for config, kernel in ((PllavaConfig.from_pretrained(tiny_model_dir), True), (cfg, False)):
        assert (config.vision.head_dim % 16 == 0) == kernel
        layers = PllavaVision(config).vision_tower.vision_model.encoder.layers
        assert all((layer.self_attn.attention_op is not None) == kernel for layer in layers)
