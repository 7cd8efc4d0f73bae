"""The CPU attention kernels: they are built here (CI has a compiler, so the fast path is the
one tested), they match numpy references op by op, and a model prefilling and decoding through
them gives the logits of the same model on MindSpore's own ops."""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

import pllava.llama as llama_module
from pllava import cpu_kernels
from pllava.config import PllavaConfig
from pllava.llama import MASK_VALUE
from pllava.model import PllavaLanguage


def reference(q, mask, slots, scale, blocks, slots_total):
    """softmax(scale * q.k + mask) . v over the slots' rows of 2-D blocks, in float64."""
    b, kvh, g, d = q.shape
    keys = [k.reshape(slots_total, kvh, -1, d) for k, _ in blocks]
    vals = [v.reshape(slots_total, kvh, -1, d) for _, v in blocks]
    keys = np.concatenate(keys, 2)[slots].astype(np.float64)     # (B, KVH, P, D)
    vals = np.concatenate(vals, 2)[slots].astype(np.float64)
    score = np.einsum("bhgd,bhpd->bhgp", q.astype(np.float64), keys) * scale + mask[:, None, None, :]
    visible = mask[:, None, None, :] > MASK_VALUE / 10
    score = np.where(visible, score, -np.inf)
    out = np.zeros((b, kvh, g, d))
    for i in range(b):
        if visible[i].any():
            p = np.exp(score[i] - score[i].max(-1, keepdims=True))
            out[i] = np.einsum("hgp,hpd->hgd", p / p.sum(-1, keepdims=True), vals[i])
    return out


def test_the_kernel_is_built_on_this_machine():
    assert cpu_kernels.build_library() is not None, "no CPU kernel: is g++ installed?"
    assert cpu_kernels.decode_attention_op() is not None


@pytest.mark.parametrize("batch, slots_total, kvh, group, block_rows", [
    (3, 4, 2, 2, (5, 9)),      # grouped-query heads, two blocks, some slots
    (4, 4, 3, 1, (17,)),       # every slot, one block
    (1, 2, 2, 4, (3, 4, 6)),   # one stream, three blocks
])
def test_kernel_matches_a_reference(batch, slots_total, kvh, group, block_rows):
    rng = np.random.default_rng(batch + kvh)
    d = 8
    q = rng.standard_normal((batch, kvh, group, d)).astype(np.float32)
    blocks = [(rng.standard_normal((slots_total * kvh * r, d)).astype(np.float32),
               rng.standard_normal((slots_total * kvh * r, d)).astype(np.float32)) for r in block_rows]
    p = sum(block_rows)
    mask = np.where(rng.random((batch, p)) < 0.3, MASK_VALUE, 0.0).astype(np.float32)
    mask[0] = MASK_VALUE                     # a row that sees nothing gets zeros
    if batch > 1:
        mask[1] = 0.0                        # a row that sees everything
    slots = rng.permutation(slots_total)[:batch].astype(np.int32)
    op = cpu_kernels.decode_attention_op()
    args = [Tensor(q), Tensor(mask), Tensor(slots), Tensor(np.array([0.37], np.float32))]
    for k, v in blocks:
        args += [Tensor(k), Tensor(v)]
    out = op(*args).asnumpy()
    ref = reference(q, mask, slots, 0.37, blocks, slots_total)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)
    assert not out[0].any()


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PLLAVA_CPU_KERNELS", "0")
    cpu_kernels.build_library.cache_clear()
    try:
        assert cpu_kernels.build_library() is None
        assert cpu_kernels.decode_attention_op() is None
        assert cpu_kernels.gather_slot_rows_op(2, 2) is None
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


def test_gather_kernel_copies_each_slots_rows_of_every_block():
    rng = np.random.default_rng(3)
    slots_total, kvh, d, block_rows = 3, 2, 8, (5, 9, 4)
    blocks = [rng.standard_normal((slots_total * kvh * r, d)).astype(np.float32) for r in block_rows]
    slots = np.array([2], np.int32)
    out = cpu_kernels.gather_slot_rows_op(slots_total, kvh)(Tensor(slots), *map(Tensor, blocks)).asnumpy()
    expected = np.concatenate([b.reshape(slots_total, kvh, -1, d) for b in blocks], 2)[slots]
    assert out.shape == (1, kvh, sum(block_rows), d)
    np.testing.assert_array_equal(out, expected)


def test_prefill_and_decode_through_the_kernels_equal_mindspores_ops(hf_tiny_dir, cfg, monkeypatch):
    fast = PllavaLanguage.from_pretrained(hf_tiny_dir, cfg, num_slots=4, max_len=256, min_context=64)
    assert fast.lm.kernel_decode
    monkeypatch.setattr(llama_module, "attention_kernels_for", lambda *args: (None, None))
    plain = PllavaLanguage.from_pretrained(hf_tiny_dir, cfg, num_slots=4, max_len=256, min_context=64)
    assert not plain.lm.kernel_decode
    for ours, theirs in zip(decode_logits(fast, cfg), decode_logits(plain, cfg)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
