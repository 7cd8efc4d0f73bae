"""LLaMA decoder with a preallocated KV cache written by position.

Two entry points, each with shapes that do not change from token to token so that
``mindspore.jit`` compiles them once (prefill once per length bucket):

* ``prefill(embeds (1, L, D), positions (1, L), slot (1,), logit_index (n,))`` runs one
  prompt, writes its keys/values into cache slot ``slot`` and returns logits at
  ``logit_index``;
* ``decode(tokens (S,), positions (S,))`` advances every cache slot by one token and returns
  (S, vocab) logits. Free slots compute garbage that nobody reads.

The cache of each layer is one Parameter of shape (slots * kv_heads * max_len, head_dim),
written with ``ops.scatter_update`` on axis 0, which updates in place; scatter_nd_update and
slice assignment copy the whole cache on every write.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .config import TextConfig
from .layers import Backend, Linear, RMSNorm, new_param, rope_tables, rotate_half

MASK_VALUE = -1e9  # added to fp32 scores; finite so fully-masked garbage rows stay NaN-free


class LlamaAttention(nn.Cell):
    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int, max_len: int):
        super().__init__()
        dtype = backend.dtype
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.group = self.num_heads // self.num_kv_heads
        self.head_dim = cfg.head_dim
        self.num_slots = num_slots
        self.max_len = max_len
        self.scale = self.head_dim ** -0.5
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = Linear(d, self.num_heads * hd, bias, dtype)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias, dtype)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias, dtype)
        self.o_proj = Linear(self.num_heads * hd, d, bias, dtype)
        rows = num_slots * self.num_kv_heads * max_len
        self.k_cache = Parameter(Tensor(np.zeros((rows, hd)), dtype), name="k_cache", requires_grad=False)
        self.v_cache = Parameter(Tensor(np.zeros((rows, hd)), dtype), name="v_cache", requires_grad=False)
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.av = ops.BatchMatMul()

    def _project(self, x, cos, sin):
        """q (B, L, H, hd), k and v (B, kvh, L, hd) with RoPE. x: (B, L, D); cos/sin: (B, L, 1, hd)."""
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def _attend(self, q, k, v, mask):
        """q: (B, kvh, g*Lq, hd) grouped by kv head; k, v: (B, kvh, Lk, hd); mask broadcasts
        to (B, kvh, g, Lq, Lk). Softmax in fp32 as the reference's eager path does."""
        b, kvh, gl, hd = q.shape
        lk = k.shape[2]
        scores = self.qk(q, k).astype(ms.float32) * self.scale
        scores = scores.reshape(b, kvh, self.group, gl // self.group, lk) + mask
        probs = ops.softmax(scores, -1).astype(v.dtype).reshape(b, kvh, gl, lk)
        return self.av(probs, v)  # (B, kvh, g*Lq, hd)

    def prefill(self, x, cos, sin, write_index, mask):
        """x: (1, L, D), mask: (L, L) causal additive. Writes k/v to the cache at
        ``write_index`` (B, kvh, L) and attends over the fresh k/v."""
        b, l, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        k = ops.depend(k, ops.scatter_update(self.k_cache, write_index, k))
        v = ops.depend(v, ops.scatter_update(self.v_cache, write_index, v))
        q = q.transpose(0, 2, 1, 3).reshape(b, self.num_kv_heads, self.group * l, self.head_dim)
        out = self._attend(q, k, v, mask)
        out = out.reshape(b, self.num_heads, l, self.head_dim).transpose(0, 2, 1, 3)
        return self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim))

    def decode(self, x, cos, sin, write_index, mask):
        """x: (S, 1, D) one token per slot, mask: (S, 1, 1, 1, max_len) over cached positions."""
        s = x.shape[0]
        q, k, v = self._project(x, cos, sin)
        k_cache = ops.scatter_update(self.k_cache, write_index, k)  # in place; returns the cache
        v_cache = ops.scatter_update(self.v_cache, write_index, v)
        shape = (s, self.num_kv_heads, self.max_len, self.head_dim)
        q = q.reshape(s, self.num_kv_heads, self.group, self.head_dim)
        out = self._attend(q, k_cache.reshape(shape), v_cache.reshape(shape), mask)
        return self.o_proj(out.reshape(s, 1, self.num_heads * self.head_dim))


class LlamaMLP(nn.Cell):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, dtype):
        super().__init__()
        d, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(d, i, bias, dtype)
        self.up_proj = Linear(d, i, bias, dtype)
        self.down_proj = Linear(i, d, bias, dtype)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, cfg: TextConfig, backend: Backend, num_slots: int, max_len: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.self_attn = LlamaAttention(cfg, backend, num_slots, max_len)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.mlp = LlamaMLP(cfg, backend.dtype)

    def prefill(self, x, cos, sin, write_index, mask):
        x = x + self.self_attn.prefill(self.input_layernorm(x), cos, sin, write_index, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, write_index, mask):
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, write_index, mask)
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
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False, backend.dtype)
        cos, sin = rope_tables(cfg.head_dim, max_len, cfg.rope_theta)
        self.rope_cos = Tensor(cos)
        self.rope_sin = Tensor(sin)
        self.cache_positions = Tensor(np.arange(max_len, dtype=np.int32))
        self.slot_range = Tensor(np.arange(num_slots, dtype=np.int32))
        self.kv_head_offsets = Tensor(np.arange(cfg.num_key_value_heads, dtype=np.int32))
        self.logits_matmul = ops.MatMul(transpose_b=True)

    def embed(self, ids):
        return self.model.embed_tokens(ids)

    def _rope(self, positions):
        """positions (B, L) -> cos/sin (B, L, 1, hd) in the compute dtype."""
        cos = ops.gather(self.rope_cos, positions, 0).astype(self.dtype)
        sin = ops.gather(self.rope_sin, positions, 0).astype(self.dtype)
        return ops.expand_dims(cos, 2), ops.expand_dims(sin, 2)

    def _write_index(self, slots, positions):
        """Cache rows for (slot, kv head, position): (B, kvh, L)."""
        kvh = self.cfg.num_key_value_heads
        base = slots.reshape(-1, 1, 1) * kvh + self.kv_head_offsets.reshape(1, -1, 1)
        return base * self.max_len + positions.reshape(positions.shape[0], 1, -1)

    def _logits(self, h):
        h = self.model.norm(h)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.logits_matmul(h, weight).astype(ms.float32)

    def prefill(self, embeds, positions, slot, logit_index):
        """embeds (1, L, D) with positions (1, L) = 0..L-1 into cache ``slot`` (1,);
        returns fp32 logits (n, vocab) at the sequence indices ``logit_index`` (n,)."""
        cos, sin = self._rope(positions)
        write_index = self._write_index(slot, positions)
        pos = positions.reshape(-1)
        mask = (pos.reshape(1, -1) > pos.reshape(-1, 1)).astype(ms.float32) * MASK_VALUE
        h = embeds
        for layer in self.model.layers:
            h = layer.prefill(h, cos, sin, write_index, mask)
        h = ops.gather(h[0], logit_index, 0)
        return self._logits(h)

    def decode(self, tokens, positions):
        """tokens (S,) at positions (S,), one per cache slot -> fp32 logits (S, vocab)."""
        s = tokens.shape[0]
        h = self.embed(tokens).reshape(s, 1, -1)
        pos = positions.reshape(s, 1)
        cos, sin = self._rope(pos)
        write_index = self._write_index(self.slot_range, pos)
        future = self.cache_positions.reshape(1, -1) > pos
        mask = (future.astype(ms.float32) * MASK_VALUE).reshape(s, 1, 1, 1, self.max_len)
        for layer in self.model.layers:
            h = layer.decode(h, cos, sin, write_index, mask)
        return self._logits(h.reshape(s, -1))
