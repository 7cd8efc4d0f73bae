"""LLaMA decoder over a preallocated KV cache that is read by length bucket.

One compiled entry point serves prefill and decode alike: ``B`` sequences feed ``L`` new
tokens each, write their keys/values into their cache slots, and attend over the first
``P`` cached positions of their slot (``context`` = arange(P)). Shapes are chosen from small
fixed sets by the caller (``PllavaLanguage``), so ``mindspore.jit`` compiles each
(B, L, P) once:

* decode: ``L = 1``, ``B`` a batch bucket (the live sequences, padded by repeating one),
  ``P`` a context bucket covering the longest live sequence, so a step costs what the live
  tokens need, not ``slots x max_len``;
* chunked prefill: ``B = 1``, ``L`` a chunk of the prompt, ``P`` covering the chunk's end.
  Memory grows with ``L x P`` per chunk, never with the square of the prompt.

The cache of each layer is one Parameter of shape (slots * kv_heads * max_len, head_dim):
rows of one (slot, kv head) are contiguous by position, so a length-``P`` prefix is one
``ops.gather`` of ``P`` rows per head. It is written with ``ops.scatter_update`` on axis 0,
which updates in place (scatter_nd_update and slice assignment copy the whole cache).

The additive mask and the RoPE tables are broadcast explicitly (``ops.broadcast_to``)
before they meet the scores and q/k: an implicitly broadcasting binary op on a graph input
kept one buffer per layer alive on MindSpore 2.10 CPU (measured: 1.7 GB against 0.17 GB
for 12 layers at 128 x 4096), which is what made long prompts run out of memory.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .config import TextConfig
from .layers import Backend, FusedLinear, Linear, RMSNorm, new_param, rope_tables, rotate_half_matrix

MASK_VALUE = -1e9  # added to fp32 scores; finite so fully-masked garbage rows stay NaN-free


class LlamaAttention(nn.Cell):
    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int, max_len: int):
        super().__init__()
        dtype, in_out = backend.dtype, backend.linear_in_out
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.group = self.num_heads // self.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.qkv_proj = FusedLinear(d, {"q_proj": self.num_heads * hd, "k_proj": self.num_kv_heads * hd,
                                        "v_proj": self.num_kv_heads * hd}, bias, dtype, in_out)
        self.o_proj = Linear(self.num_heads * hd, d, bias, dtype, in_out)
        self.num_slots = num_slots
        self.max_len = max_len
        rows = num_slots * self.num_kv_heads * max_len
        self.k_cache = Parameter(Tensor(np.zeros((rows, hd)), dtype), name="k_cache", requires_grad=False)
        self.v_cache = Parameter(Tensor(np.zeros((rows, hd)), dtype), name="v_cache", requires_grad=False)
        self.rotate = Tensor(rotate_half_matrix(hd), dtype)
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.av = ops.BatchMatMul()

    def construct(self, x, cos, sin, write_index, read_index, mask):
        """x (B, L, D); cos/sin (B, L, 1, hd); write_index (B, kvh, L) and read_index
        (B, kvh, P) are cache rows; mask (B, 1, 1, L, P) additive. Softmax in fp32 as the
        reference's eager path does."""
        b, l, _ = x.shape
        p = read_index.shape[-1]
        heads = self.num_heads + 2 * self.num_kv_heads
        qkv = self.qkv_proj(x).reshape(b, l, heads, self.head_dim)
        qk, v = ops.split(qkv, (self.num_heads + self.num_kv_heads, self.num_kv_heads), 2)
        rotated = ops.matmul(qk.reshape(-1, self.head_dim), self.rotate).reshape(qk.shape)
        qk = qk * ops.broadcast_to(cos, qk.shape) + rotated * ops.broadcast_to(sin, qk.shape)
        q, k = ops.split(qk, (self.num_heads, self.num_kv_heads), 2)
        k_cache = ops.scatter_update(self.k_cache, write_index, k.transpose(0, 2, 1, 3))
        v_cache = ops.scatter_update(self.v_cache, write_index, v.transpose(0, 2, 1, 3))
        if b == self.num_slots and p == self.max_len:
            # every slot over the whole context, in slot order (the caller's contract for
            # this shape): the cache itself is the operand, no gathered copy
            keys = k_cache.reshape(b, self.num_kv_heads, p, self.head_dim)
            values = v_cache.reshape(b, self.num_kv_heads, p, self.head_dim)
        else:
            rows = read_index.reshape(-1)
            keys = ops.gather(k_cache, rows, 0).reshape(b, self.num_kv_heads, p, self.head_dim)
            values = ops.gather(v_cache, rows, 0).reshape(b, self.num_kv_heads, p, self.head_dim)
        q = q.transpose(0, 2, 1, 3).reshape(b, self.num_kv_heads, self.group * l, self.head_dim)
        scores = self.qk(q, keys).astype(ms.float32) * self.scale
        scores = scores.reshape(b, self.num_kv_heads, self.group, l, p)
        scores = scores + ops.broadcast_to(mask, scores.shape)
        probs = ops.softmax(scores, -1).astype(values.dtype).reshape(b, self.num_kv_heads, self.group * l, p)
        out = self.av(probs, values).reshape(b, self.num_heads, l, self.head_dim).transpose(0, 2, 1, 3)
        return self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim))


class LlamaMLP(nn.Cell):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, backend: Backend):
        super().__init__()
        d, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        dtype, in_out = backend.dtype, backend.linear_in_out
        self.gate_up_proj = FusedLinear(d, {"gate_proj": i, "up_proj": i}, bias, dtype, in_out)
        self.down_proj = Linear(i, d, bias, dtype, in_out)

    def construct(self, x):
        gate, up = ops.split(self.gate_up_proj(x), self.gate_up_proj.sizes, -1)
        return self.down_proj(ops.silu(gate) * up)


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int, max_len: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.self_attn = LlamaAttention(cfg, backend, num_slots, max_len)
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
    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int, max_len: int):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, backend.dtype)
        self.layers = nn.CellList([LlamaDecoderLayer(cfg, backend, num_slots, max_len)
                                   for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)


class LlamaForCausalLM(nn.Cell):
    """HF ``LlamaForCausalLM`` names (``model.*``, ``lm_head``) plus the static KV cache."""

    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int = 1, max_len: int | None = None):
        super().__init__()
        max_len = max_len or cfg.max_position_embeddings
        self.cfg = cfg
        self.num_slots = num_slots
        self.max_len = max_len
        self.dtype = backend.dtype
        self.model = LlamaModel(cfg, backend, num_slots, max_len)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, False, backend.dtype, backend.linear_in_out))
        cos, sin = rope_tables(cfg.head_dim, max_len, cfg.rope_theta)
        self.rope_cos = Tensor(cos)
        self.rope_sin = Tensor(sin)
        self.kv_head_offsets = Tensor(np.arange(cfg.num_key_value_heads, dtype=np.int32))
        self.tied_logits = ops.MatMul(transpose_b=True)

    def embed(self, ids):
        return self.model.embed_tokens(ids)

    def _logits(self, h):
        h = self.model.norm(h)
        if self.lm_head is None:
            return self.tied_logits(h, self.model.embed_tokens.weight).astype(ms.float32)
        return self.lm_head(h).astype(ms.float32)

    def _run(self, h, positions, slots, context):
        """h (B, L, D) at positions (B, L) in cache slots (B,), attending over cached
        positions ``context`` (P,) -> hidden states (B, L, D)."""
        b, l = positions.shape
        p = context.shape[0]
        cos = ops.expand_dims(ops.gather(self.rope_cos, positions, 0).astype(self.dtype), 2)
        sin = ops.expand_dims(ops.gather(self.rope_sin, positions, 0).astype(self.dtype), 2)
        base = (slots.reshape(b, 1, 1) * self.cfg.num_key_value_heads
                + self.kv_head_offsets.reshape(1, -1, 1)) * self.max_len
        write_index = base + positions.reshape(b, 1, l)
        read_index = base + context.reshape(1, 1, p)
        future = context.reshape(1, 1, p) > positions.reshape(b, l, 1)
        mask = (future.astype(ms.float32) * MASK_VALUE).reshape(b, 1, 1, l, p)
        for layer in self.model.layers:
            h = layer(h, cos, sin, write_index, read_index, mask)
        return h

    def prefill(self, embeds, positions, slots, context, logit_index):
        """A chunk of prompt embeddings (B, L, D) -> fp32 logits (n, vocab) at the flat
        (B * L) indices ``logit_index`` (n,)."""
        b, l, d = embeds.shape
        h = self._run(embeds, positions, slots, context)
        return self._logits(ops.gather(h.reshape(b * l, d), logit_index, 0))

    def decode(self, tokens, positions, slots, context):
        """One token per sequence: tokens, positions, slots (B,) -> fp32 logits (B, vocab)."""
        b = tokens.shape[0]
        h = self._run(self.embed(tokens).reshape(b, 1, -1), positions.reshape(b, 1), slots, context)
        return self._logits(h.reshape(b, -1))
