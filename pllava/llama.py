"""LLaMA decoder over a preallocated KV cache in position blocks, read by length bucket.

One compiled entry point serves prefill and decode alike: ``B`` sequences feed ``L`` new
tokens each, write their keys/values into their cache slots, and attend over the first
``P`` cached positions of their slot. Shapes are chosen from small fixed sets by the caller
(``PllavaLanguage``), so ``mindspore.jit`` compiles each (B, L, P) once:

* decode: ``L = 1``, ``B`` a batch bucket (the live sequences), ``P`` a context bucket
  covering the longest of them, so a step costs what the live tokens need, not
  ``slots x max_len``;
* chunked prefill: ``B = 1``, ``L`` a chunk of the prompt, ``P`` covering the chunk's end.
  Memory grows with ``L x P`` per chunk, never with the square of the prompt.

Without the CPU kernels the cache of each layer is split by position into *blocks* whose
ends are the context buckets ([0, 512), [512, 1024), [1024, 2048), ...; with them it is one
block of ``max_len``: see ``LlamaForCausalLM``), one Parameter per block of shape
(slots * kv_heads * (block + 1), head_dim): rows of one (slot, kv head) are contiguous by
position, followed by one *spare row* that takes every write aimed outside the block (and
the writes of rows that feed nothing). In fp32 the blocks hold numpy's zero pages as they are
(``zeros_parameter``), so only written rows become resident memory. A step at context bucket
``P`` reads exactly the blocks below ``P``. A decode step (``L = 1``) on the CPU hands the
block to the project's kernel (:mod:`pllava.cpu_kernels`), which writes each row's key and
value and reads each row's own positions in place: one graph per batch bucket serves every
context (``P`` is then ``max_len``, and costs nothing). Elsewhere a decode step concatenates
the blocks' scores (one query per head: small) for one softmax; when its rows are every
slot in slot order, each block *is* the operand of attention,
reshaped (no gather, though MindSpore's CPU backend copies a written Parameter to reshape
it: ~1 ms per 16.8 MB block, measured), otherwise one ``ops.gather`` per block picks the
slots' rows. A prefill chunk gathers the blocks' keys and values into one operand each
instead (they are ``head_dim`` wide, its scores are ``L`` wide), so its scores are made
once and passed over as few times as possible. On the CPU a second kernel does a prefill
chunk's attention over the blocks in place instead: it writes the chunk's keys and values,
then reads each row's positions 0..pos in tiles with a running softmax, so no scores or
copy of the cache are made and, as for decode, one graph per chunk size serves every
context (a 32-row chunk at positions 3000-3031, side by side: 223 -> 126 ms).
The spare rows are always masked. Blocks are written with ``ops.scatter_update`` on axis 0,
which updates in place (scatter_nd_update and slice assignment copy the whole cache).

The additive mask and the RoPE tables are broadcast explicitly (``ops.broadcast_to``)
before they meet the scores and q/k: an implicitly broadcasting binary op on a graph input
kept one buffer per layer alive on MindSpore 2.10 CPU (measured: 1.7 GB against 0.17 GB
for 12 layers at 128 x 4096), which is what made long prompts run out of memory.
"""
from __future__ import annotations

from dataclasses import replace

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, lazy_inline, nn, ops

from .config import TextConfig
from .cpu_kernels import (decode_attention_op, half_linear_op, half_linear_vectorized, prefill_attention_op,
                          silu_mul_op)
from .layers import Backend, FusedLinear, Linear, RMSNorm, new_param, rope_tables, rotate_half_matrix

MASK_VALUE = -1e9  # added to fp32 scores; finite so fully-masked garbage rows stay NaN-free


class LlamaAttention(nn.Cell):
    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int, blocks: tuple[int, ...]):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.group = self.num_heads // self.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.qkv_proj = FusedLinear(d, {"q_proj": self.num_heads * hd, "k_proj": self.num_kv_heads * hd,
                                        "v_proj": self.num_kv_heads * hd}, bias,
                                    *linear_setup(backend, "q_proj", "k_proj", "v_proj"))
        self.o_proj = Linear(self.num_heads * hd, d, bias, *linear_setup(backend, "o_proj"))
        self.num_slots = num_slots
        self.blocks = cache_blocks(blocks)
        self.k_cache = ms.ParameterTuple(self._block_params("k_cache", backend.dtype))
        self.v_cache = ms.ParameterTuple(self._block_params("v_cache", backend.dtype))
        self.rotate = Tensor(rotate_half_matrix(hd), backend.dtype)
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.av = ops.BatchMatMul()
        self.decode_kernel, self.prefill_kernel = attention_kernels_for(backend, self.num_heads, self.head_dim)
        self.scale_tensor = Tensor(np.array([self.scale], np.float32))
        self.block_row_counts = Tensor(np.array([size + 1 for _, size in self.blocks], np.int32))

    def _block_params(self, name: str, dtype) -> list[Parameter]:
        shapes = [(self.num_slots * self.num_kv_heads * (size + 1), self.head_dim) for _, size in self.blocks]
        return [zeros_parameter(shape, dtype, f"{name}.{j}") for j, shape in enumerate(shapes)]

    def construct(self, x, cos, sin, write_index, read_index, mask):
        """x (B, L, D); cos/sin (B, L, 1, hd); per block read: write_index[j] (B, kvh, L)
        and read_index[j] (B, kvh, block + 1) cache rows; mask (B, 1, 1, L, P') additive
        over the read blocks' rows. Softmax in fp32 as the reference's eager path does.
        With the CPU kernels a step gets the whole RoPE tables (max_len, hd) as cos/sin, a
        1-tuple of the positions ((B,) for decode, (B, L) for a prefill chunk) as
        ``write_index`` and of the slots as ``read_index`` (decode: (B, 3) rows of slot,
        prefix slot, prefix rows; a chunk: (B,)), or 2-tuples (the chunk's, then the decode
        rows') for a mixed step, and in place of the mask an unused tensor (the kernels
        rotate, write and read the rows themselves)."""
        b, l, _ = x.shape
        heads = self.num_heads + 2 * self.num_kv_heads
        qkv = self.qkv_proj(x).reshape(b, l, heads, self.head_dim)
        if self.decode_kernel is not None and len(write_index) == 2:  # a chunk and decode rows
            out = self._mixed_attention(qkv, write_index, read_index, cos, sin)
            return self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim))
        if self.decode_kernel is not None:  # RoPE, the cache write and attention in one call
            out = self._kernel_attention(qkv, write_index[0], read_index[0], cos, sin)
            return self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim))
        qk, v = ops.split(qkv, (self.num_heads + self.num_kv_heads, self.num_kv_heads), 2)
        rotated = ops.matmul(qk.reshape(-1, self.head_dim), self.rotate).reshape(qk.shape)
        qk = qk * ops.broadcast_to(cos, qk.shape) + rotated * ops.broadcast_to(sin, qk.shape)
        q, k = ops.split(qk, (self.num_heads, self.num_kv_heads), 2)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        q = q.transpose(0, 2, 1, 3).reshape(b, self.num_kv_heads, self.group * l, self.head_dim)
        if l > 1:
            out = self._prefill_attention(q, k, v, write_index, read_index, mask)
        else:
            out = self._decode_attention(q, k, v, write_index, read_index, mask)
        out = out.reshape(b, self.num_heads, l, self.head_dim).transpose(0, 2, 1, 3)
        return self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim))

    def _prefill_attention(self, q, k, v, write_index, read_index, mask):
        """A prefill chunk: the read blocks' keys and values gathered into one operand each,
        then one product, one masked softmax and one product. Its scores (L queries x P rows
        per head) are the largest tensors of the chunk, so each is made once and passed over
        as few times as possible: the scale is folded into q, the mask comes at the scores'
        full shape, and no concat or split of scores is needed."""
        b, _, gl, hd = q.shape
        keys, vals = [], []
        for j in range(len(write_index)):
            size = self.blocks[j][1] + 1
            rows = read_index[j].reshape(-1)
            k_block = ops.scatter_update(self.k_cache[j], write_index[j], k)
            v_block = ops.scatter_update(self.v_cache[j], write_index[j], v)
            keys.append(ops.gather(k_block, rows, 0).reshape(b, self.num_kv_heads, size, hd))
            vals.append(ops.gather(v_block, rows, 0).reshape(b, self.num_kv_heads, size, hd))
        keys = keys[0] if len(keys) == 1 else ops.concat(keys, 2)
        vals = vals[0] if len(vals) == 1 else ops.concat(vals, 2)
        return self._attend(q, keys, vals, mask)

    def _attend(self, q, keys, vals, mask):
        """One product, one masked fp32 softmax, one product over a chunk's keys and values."""
        score = self.qk(q * self.scale, keys).astype(ms.float32)
        probs = ops.softmax(score + mask.reshape(score.shape), -1).astype(vals.dtype)
        return self.av(probs, vals)

    def _kernel_attention(self, qkv, positions, slots, cos, sin):
        """A step through the CPU kernels (``kernels/decode_attention.cc`` for one token per
        sequence, ``kernels/prefill_attention.cc`` for a chunk): each gets the fused
        projection's q/k/v (B, L, heads + 2 kv heads, hd), the RoPE tables and the cache
        blocks themselves, applies RoPE, writes the keys and values at their positions and
        reads each row's positions 0..pos where they lie (no split, transpose, scatter or
        gather; a chunk never makes its scores), so one graph serves every context.
        -> (B, L, heads, hd)."""
        b, l = qkv.shape[0], qkv.shape[1]
        blocks = []
        for j in range(len(self.blocks)):
            blocks.append(self.k_cache[j])
            blocks.append(self.v_cache[j])
        if l > 1:
            return self.prefill_kernel(qkv, positions, slots, self.scale_tensor, self.block_row_counts, cos, sin,
                                       *blocks)
        return self.decode_kernel(qkv.reshape(b, -1, self.head_dim), positions, slots, self.scale_tensor,
                                  self.block_row_counts, cos, sin, *blocks)

    def _mixed_attention(self, qkv, positions, slots, cos, sin):
        """A step of one prefill chunk and one decode row per sequence, (1, L + n, ...) with
        the chunk's rows first: ``positions`` = (chunk positions (1, L), decode positions
        (n,)), ``slots`` = (the chunk's slot (1,), decode slots (n, 3)). Each part goes through
        its own kernel; every other op of the step runs on all rows at once. -> (1, L + n,
        heads, hd)."""
        n = positions[1].shape[0]
        chunk, rows = ops.split(qkv, (qkv.shape[1] - n, n), 1)
        first = self._kernel_attention(chunk, positions[0], slots[0], cos, sin)
        second = self._kernel_attention(rows.reshape(n, 1, -1, self.head_dim), positions[1], slots[1], cos, sin)
        return ops.concat((first, second.reshape(1, n, self.num_heads, self.head_dim)), 1)

    def _decode_attention(self, q, k, v, write_index, read_index, mask):
        """A decode step (one query per sequence and head: small scores): each read block's
        scores, concatenated for one softmax, over the blocks themselves when the step holds
        every slot."""
        b, _, gl, _ = q.shape
        l = gl // self.group
        in_place = b == self.num_slots  # every slot, in slot order: the caller's contract
        scores, values, sizes = [], [], []
        for j in range(len(write_index)):
            size = self.blocks[j][1] + 1
            k_block = ops.scatter_update(self.k_cache[j], write_index[j], k)
            v_block = ops.scatter_update(self.v_cache[j], write_index[j], v)
            if in_place:
                keys = k_block.reshape(b, self.num_kv_heads, size, self.head_dim)
                vals = v_block.reshape(b, self.num_kv_heads, size, self.head_dim)
            else:
                rows = read_index[j].reshape(-1)
                keys = ops.gather(k_block, rows, 0).reshape(b, self.num_kv_heads, size, self.head_dim)
                vals = ops.gather(v_block, rows, 0).reshape(b, self.num_kv_heads, size, self.head_dim)
            scores.append(self.qk(q, keys))
            values.append(vals)
            sizes.append(size)
        score = scores[0] if len(scores) == 1 else ops.concat(scores, -1)
        p = score.shape[-1]
        score = score.astype(ms.float32).reshape(b, self.num_kv_heads, self.group, l, p) * self.scale
        score = score + ops.broadcast_to(mask, score.shape)
        probs = ops.softmax(score, -1).astype(values[0].dtype).reshape(b, self.num_kv_heads, self.group * l, p)
        if len(values) == 1:
            out = self.av(probs, values[0])
        else:
            parts = ops.split(probs, tuple(sizes), -1)
            out = self.av(parts[0], values[0])
            for j in range(1, len(values)):
                out = out + self.av(parts[j], values[j])
        return out


def zeros_parameter(shape: tuple[int, ...], dtype, name: str) -> Parameter:
    """A zeroed cache Parameter whose pages become resident only where rows are written.

    In fp32 it holds a numpy array's memory as it is (``set_data`` of ``Tensor.from_numpy``):
    the operating system maps zero pages until a page is written, and the compiled steps
    write into that memory in place, so an idle slot or an unused position costs no RAM.
    ``Tensor(array)`` copied the array and the Parameter copied it again: building 8 x 4096
    positions took 7-12 s and made all 3 GiB resident at once."""
    if dtype != ms.float32:
        return Parameter(Tensor(np.zeros(shape, np.float32), dtype), name=name, requires_grad=False)
    param = Parameter(Tensor(np.zeros((1,) + tuple(shape[1:]), np.float32)), name=name, requires_grad=False)
    param.set_data(Tensor.from_numpy(np.zeros(shape, np.float32)), slice_shape=True)
    return param


def attention_kernels_for(backend: Backend, num_heads: int, head_dim: int):
    """The CPU attention kernels (decode step, prefill chunk) where they apply (CPU, fp32, the
    library built, a head width the prefill kernel's vectors divide), else (None, None): both
    or neither, as ``_run`` hands positions and slots to both or per-block row indices and a
    mask to MindSpore's ops."""
    if not backend.cpu_kernels or head_dim % PREFILL_KERNEL_WIDTH:
        return None, None
    decode, prefill = decode_attention_op(num_heads), prefill_attention_op(num_heads)
    return (decode, prefill) if decode is not None and prefill is not None else (None, None)


#: the prefill kernel's vector width: it takes head widths that are multiples of it
PREFILL_KERNEL_WIDTH = 16


def cache_blocks(ends) -> tuple[tuple[int, int], ...]:
    """Block ends (ascending context buckets) -> ((start, size), ...)."""
    out, start = [], 0
    for end in ends:
        if end <= start:
            raise ValueError(f"cache block ends must ascend, got {tuple(ends)}")
        out.append((start, end - start))
        start = end
    return tuple(out)


class LlamaMLP(nn.Cell):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, backend: Backend):
        super().__init__()
        d, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj = FusedLinear(d, {"gate_proj": i, "up_proj": i}, bias,
                                        *linear_setup(backend, "gate_proj", "up_proj"))
        self.down_proj = Linear(i, d, bias, *linear_setup(backend, "down_proj"))
        # on the CPU in fp32 the project's kernel: one call for the split, silu and product
        self.silu_mul = silu_mul_op() if backend.cpu_kernels else None

    def construct(self, x):
        if self.silu_mul is not None:
            return self.down_proj(self.silu_mul(self.gate_up_proj(x)))
        gate, up = ops.split(self.gate_up_proj(x), self.gate_up_proj.sizes, -1)
        return self.down_proj(ops.silu(gate) * up)


class LlamaDecoderLayer(nn.Cell):
    """One block. ``lazy_inline`` (front policy) has the compiler parse the block once and
    inline copies instead of parsing every layer: measured on the benchmark model (12
    layers), each graph compiled in about half the time and ran 1.1-1.2x faster."""

    @lazy_inline(policy="front")
    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int, blocks: tuple[int, ...]):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.self_attn = LlamaAttention(cfg, backend, num_slots, blocks)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.mlp = LlamaMLP(cfg, backend)

    def construct(self, x, cos, sin, write_index, read_index, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, write_index, read_index, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Cell):
    def __init__(self, vocab: int, dim: int, dtype):
        super().__init__()
        self.weight = new_param((vocab, dim), dtype, "weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class LlamaModel(nn.Cell):
    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int, blocks: tuple[int, ...]):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, backend.dtype)
        self.layers = nn.CellList([LlamaDecoderLayer(cfg, backend, num_slots, blocks)
                                   for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)


class LlamaForCausalLM(nn.Cell):
    """HF ``LlamaForCausalLM`` names (``model.*``, ``lm_head``) plus the static KV cache of
    ``num_slots`` sequences of ``max_len`` positions, in blocks ending at ``blocks``
    (ascending, the last = ``max_len``; default one block) where MindSpore's ops read the
    cache (a step reads up to its context bucket). The CPU kernels read each row's own
    positions where they lie, so there the cache is one block whatever ``blocks`` says:
    each block is a Parameter that every layer's kernel call is handed, and with four (8 x
    4096 ending at 512, 1024, 2048, 4096) a 1-stream decode step took 20.5 ms against 19.5
    with one, 7 streams 37.0 against 36.1, a 256-position chunk at 2048 320 against 311
    (the benchmark model, one process, alternating). ``half_weights``: (projection kind,
    half dtype) pairs the checkpoint stores so, kept so where :func:`half_weights_allowed`."""

    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int = 1, max_len: int | None = None,
                 blocks: tuple[int, ...] | None = None, half_weights: tuple = ()):
        super().__init__()
        max_len = max_len or cfg.max_position_embeddings
        blocks = tuple(blocks or (max_len,))
        if blocks[-1] != max_len:
            raise ValueError(f"the last cache block must end at max_len {max_len}, got {blocks}")
        #: whether the CPU kernels do attention (then every step reads each sequence's own
        #: positions, whatever its context bucket: one graph per batch bucket and chunk size,
        #: and the cache one block)
        self.kernel_attention = attention_kernels_for(backend, cfg.num_attention_heads, cfg.head_dim)[0] is not None
        if self.kernel_attention:
            blocks = (max_len,)
        self.cfg = cfg
        self.num_slots = num_slots
        self.max_len = max_len
        self.blocks = cache_blocks(blocks)
        self.dtype = backend.dtype
        backend = replace(backend, half_weights=tuple(half_weights) if half_weights_allowed(backend) else ())
        self.model = LlamaModel(cfg, backend, num_slots, blocks)
        head_dtype, _, head_op = linear_setup(backend, "lm_head")
        self.lm_head = (None if cfg.tie_word_embeddings else  # (x W^T at every row count: faster here)
                        Linear(cfg.hidden_size, cfg.vocab_size, False, head_dtype, half_op=head_op))
        cos, sin = rope_tables(cfg.head_dim, max_len, cfg.rope_theta)
        self.rope_cos = Tensor(cos)
        self.rope_sin = Tensor(sin)
        self.kv_head_offsets = Tensor(np.arange(cfg.num_key_value_heads, dtype=np.int32))
        self.block_rows = tuple(Tensor(np.arange(size + 1, dtype=np.int32)) for _, size in self.blocks)
        #: whether any projection keeps its weights in half precision
        self.half_weights_kept = any(isinstance(c, Linear) and c.packed for _, c in self.cells_and_names())
        self.tied_logits = ops.MatMul(transpose_b=True)

    def embed(self, ids):
        return self.model.embed_tokens(ids)

    def _logits(self, h):
        h = self.model.norm(h)
        if self.lm_head is None:
            return self.tied_logits(h, self.model.embed_tokens.weight).astype(ms.float32)
        return self.lm_head(h).astype(ms.float32)

    def _run(self, h, positions, slots, key_positions):
        """h (B, L, D) at positions (B, L) in cache slots (B,), attending over the blocks
        whose rows ``key_positions`` (P',) lists (``block_key_positions``) -> hidden
        states (B, L, D). A position of -1 feeds nothing: its keys/values go to spare rows.
        Through the CPU kernels a step reads each sequence's positions 0..pos whatever
        ``key_positions`` says, and a decode step's ``slots`` are (B, 3) rows of slot,
        prefix slot and prefix rows (``PllavaLanguage.share_prefixes``)."""
        b, l = positions.shape
        if self.kernel_attention:  # the kernels rotate, write and read the rows themselves
            where = positions.reshape(b) if l == 1 else positions
            for layer in self.model.layers:  # (the whole RoPE tables; no mask: the slots stand in, unused)
                h = layer(h, self.rope_cos, self.rope_sin, (where,), (slots,), slots)
            return h
        clamped = ops.maximum(positions, 0)
        cos = ops.expand_dims(ops.gather(self.rope_cos, clamped, 0).astype(self.dtype), 2)
        sin = ops.expand_dims(ops.gather(self.rope_sin, clamped, 0).astype(self.dtype), 2)
        p = key_positions.shape[0]
        heads = (slots.reshape(b, 1, 1) * self.cfg.num_key_value_heads + self.kv_head_offsets.reshape(1, -1, 1))
        at = positions.reshape(b, 1, l)
        write_index, read_index, covered = [], [], 0
        for j in range(len(self.blocks)):
            if covered < p:
                start, size = self.blocks[j]
                inside = ops.logical_and(at >= start, at < start + size)
                offset = ops.select(inside, at - start, ops.zeros_like(at) + size)
                write_index.append(heads * (size + 1) + offset)
                read_index.append(heads * (size + 1) + self.block_rows[j].reshape(1, 1, -1))
                covered += size + 1
        future = key_positions.reshape(1, 1, p) > positions.reshape(b, l, 1)
        mask = (future.astype(ms.float32) * MASK_VALUE).reshape(b, 1, 1, l, p)
        if l > 1:  # at the scores' shape once, rather than broadcast in every layer
            mask = ops.broadcast_to(mask, (b, self.cfg.num_key_value_heads, self.cfg.num_attention_heads
                                           // self.cfg.num_key_value_heads, l, p))
        write_index, read_index = tuple(write_index), tuple(read_index)
        for layer in self.model.layers:
            h = layer(h, cos, sin, write_index, read_index, mask)
        return h

    def prefill(self, embeds, positions, slots, key_positions, logit_index):
        """A chunk of prompt embeddings (B, L, D) -> fp32 logits (n, vocab) at the flat
        (B * L) indices ``logit_index`` (n,)."""
        b, l, d = embeds.shape
        h = self._run(embeds, positions, slots, key_positions)
        return self._logits(ops.gather(h.reshape(b * l, d), logit_index, 0))

    def mixed(self, embeds, chunk_positions, chunk_slot, tokens, positions, slots, logit_index):
        """One prefill chunk (1, L, D) at ``chunk_positions`` (1, L) into ``chunk_slot`` (1,)
        and one decode token per sequence (``tokens``, ``positions``: (n,), ``slots``: (n, 3)) in ONE
        pass: the projections read their weights once for both. CPU kernels only.
        -> fp32 logits at the flat row indices ``logit_index`` of the L + n rows."""
        l, n, d = embeds.shape[1], tokens.shape[0], embeds.shape[2]
        h = ops.concat((embeds, self.embed(tokens).reshape(1, n, d)), 1)
        for layer in self.model.layers:
            h = layer(h, self.rope_cos, self.rope_sin, (chunk_positions, positions), (chunk_slot, slots), slots)
        return self._logits(ops.gather(h.reshape(l + n, d), logit_index, 0))

    def mixed_part(self, hidden, chunk_positions, chunk_slot, tokens, positions, slots, logit_index, first, last):
        """:meth:`mixed` for one part of a chunk run in several steps: the chunk's rows (1, L,
        D) enter at layer ``first`` (``hidden``: its embeddings when 0) and go through layers
        ``first`` to ``last`` - 1 beside the decode rows, which go through every layer (alone
        outside those). ``first``/``last`` are constants of the graph. -> (the chunk's rows
        after layer ``last`` - 1, fp32 logits at the flat row indices ``logit_index`` of the
        L + n rows after the last layer: a chunk row's are its own only when ``last`` is the
        layer count)."""
        l, n, d = hidden.shape[1], tokens.shape[0], hidden.shape[2]
        layers = self.model.layers
        rows = self.embed(tokens).reshape(n, 1, d)
        for i in range(first):
            rows = layers[i](rows, self.rope_cos, self.rope_sin, (positions,), (slots,), slots)
        h = ops.concat((hidden, rows.reshape(1, n, d)), 1)
        for i in range(first, last):
            h = layers[i](h, self.rope_cos, self.rope_sin, (chunk_positions, positions), (chunk_slot, slots), slots)
        chunk, rows = ops.split(h, (l, n), 1)
        rows = rows.reshape(n, 1, d)
        for i in range(last, len(layers)):
            rows = layers[i](rows, self.rope_cos, self.rope_sin, (positions,), (slots,), slots)
        h = ops.concat((chunk, rows.reshape(1, n, d)), 1)
        return chunk, self._logits(ops.gather(h.reshape(l + n, d), logit_index, 0))

    def decode(self, tokens, positions, slots, key_positions):
        """One token per sequence: tokens, positions, slots (B,) -> fp32 logits (B, vocab).
        Through the CPU kernels ``slots`` is (B, 3): (slot, prefix slot, prefix rows) per row
        (``kernels/attention_args.h``; ``PllavaLanguage._slot_rows`` makes them)."""
        b = tokens.shape[0]
        h = self._run(self.embed(tokens).reshape(b, 1, -1), positions.reshape(b, 1), slots, key_positions)
        return self._logits(h.reshape(b, -1))


def half_weights_allowed(backend: Backend) -> bool:
    """Whether projections stored in half precision keep their weights so: on the CPU in
    float32, where the kernel (``kernels/half_linear.cc``) multiplies by them in float32
    reading half the bytes; not elsewhere (Ascend computes in half precision natively), nor
    without the kernel or its vector code."""
    return backend.cpu_kernels and half_linear_op() is not None and half_linear_vectorized()


def linear_setup(backend: Backend, *kinds: str) -> tuple:
    """(weight dtype, weight_first_rows, half_op): the arguments after ``bias`` of the
    language model's :class:`Linear` over the projections ``kinds`` (one, or the parts of a
    fused one): half precision when the backend keeps every part so in one dtype."""
    half = {dict(backend.half_weights).get(kind) for kind in kinds}
    if len(half) == 1 and None not in half:
        return half.pop(), None, half_linear_op()
    return backend.dtype, backend.weight_first_rows, None


#: the key position of a spare row: after every query, so the causal mask always hides it
SPARE_POSITION = 2 ** 30


def block_key_positions(blocks: tuple[tuple[int, int], ...], context: int) -> np.ndarray:
    """The position of every row a step at context bucket ``context`` reads: each block
    below it, then its spare row (int32, the ``key_positions`` input of ``_run``)."""
    parts = []
    for start, size in blocks:
        if start < context:
            parts.append(np.arange(start, start + size))
            parts.append(np.array([SPARE_POSITION]))
    return np.concatenate(parts).astype(np.int32)
