"""CLIP ViT vision tower that stops at the layer PLLaVA reads (``vision_feature_layer``).

hidden_states[k] in HF is the output of layer k (k = 0 is the embeddings after
``pre_layrnorm``), so with the default -2 only 23 of 24 layers run and no final LN is applied.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .config import VisionConfig
from .layers import LayerNorm, LinearFactory, new_param, plain_linears


class CLIPVisionEmbeddings(nn.Cell):
    """Patchify (a stride-14 conv done as one matmul), prepend CLS, add learned positions."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.cfg = cfg
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.class_embedding = new_param((d,), dtype, "class_embedding")
        self.patch_embedding = PatchEmbedding(c, d, p, dtype)
        self.position_embedding = PositionEmbedding(cfg.num_patches + 1, d, dtype)

    def construct(self, pixel_values):
        # pixel_values: (N, C, S, S) -> patches (N, G*G, C*P*P), row-major over the grid.
        n = pixel_values.shape[0]
        g, p, c = self.cfg.grid_size, self.cfg.patch_size, self.cfg.num_channels
        x = pixel_values.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
        patches = self.patch_embedding(x)  # (N, G*G, D)
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (n, 1, self.cfg.hidden_size))
        return ops.concat((cls.astype(patches.dtype), patches), 1) + self.position_embedding.weight


class PatchEmbedding(nn.Cell):
    """Conv2d(C->D, kernel=stride=P, no bias) holding the HF (D, C, P, P) weight."""

    def __init__(self, channels: int, dim: int, patch: int, dtype):
        super().__init__()
        self.weight = new_param((dim, channels, patch, patch), dtype, "weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, patches):
        n, l, k = patches.shape
        w = self.weight.reshape(self.weight.shape[0], k)
        return self.matmul(patches.reshape(n * l, k), w).reshape(n, l, -1)


class PositionEmbedding(nn.Cell):
    """Learned position table; positions are always 0..G*G, so the whole table is added."""

    def __init__(self, num_positions: int, dim: int, dtype):
        super().__init__()
        self.weight = new_param((num_positions, dim), dtype, "weight")


class CLIPAttention(nn.Cell):
    """``attention_op`` (:func:`pllava.cpu_kernels.full_attention_op`, the CPU in float32):
    the softmax attention of the projections' outputs as one kernel, heads split off by a
    reshape; None: MindSpore's ops (heads transposed first, every score made)."""

    def __init__(self, cfg: VisionConfig, linear: LinearFactory, attention_op=None):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj = linear(d, d, True)
        self.k_proj = linear(d, d, True)
        self.v_proj = linear(d, d, True)
        self.out_proj = linear(d, d, True)
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.av = ops.BatchMatMul()
        self.attention_op = attention_op
        self.scale_input = Tensor(np.array([self.scale], np.float32))

    def construct(self, x):
        n, l, d = x.shape
        shape = (n, l, self.num_heads, self.head_dim)
        if self.attention_op is not None:
            q, k, v = self.q_proj(x).reshape(shape), self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)
            return self.out_proj(self.attention_op(q, k, v, self.scale_input).reshape(n, l, d))
        q = (self.q_proj(x) * self.scale).reshape(shape).transpose(0, 2, 1, 3)  # (N, h, L, hd)
        k = self.k_proj(x).reshape(shape).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(shape).transpose(0, 2, 1, 3)
        probs = ops.softmax(self.qk(q, k), -1)
        out = self.av(probs, v).transpose(0, 2, 1, 3).reshape(n, l, d)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, cfg: VisionConfig, linear: LinearFactory):
        super().__init__()
        if cfg.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"vision hidden_act={cfg.hidden_act!r} is not supported")
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, True)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, True)

    def construct(self, x):
        h = self.fc1(x)
        h = h * ops.sigmoid(1.702 * h) if self.quick else ops.gelu(h, approximate="none")
        return self.fc2(h)


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype, linear: LinearFactory, attention_op=None):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.self_attn = CLIPAttention(cfg, linear, attention_op)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = CLIPMLP(cfg, linear)

    def construct(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, cfg: VisionConfig, num_layers: int, dtype, linear: LinearFactory, attention_op=None):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(cfg, dtype, linear, attention_op) for _ in range(num_layers)])

    def construct(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTransformer(nn.Cell):
    """HF ``vision_model``: only the layers up to the selected one are built and run.
    ``linear`` makes the encoder layers' projections (default: ``dtype`` weights);
    ``attention_op``: see :class:`CLIPAttention`."""

    def __init__(self, cfg: VisionConfig, num_layers: int, dtype, linear: LinearFactory | None = None,
                 attention_op=None):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.encoder = CLIPEncoder(cfg, num_layers, dtype, linear or plain_linears(dtype), attention_op)

    def construct(self, pixel_values):
        """(N, C, S, S) -> selected hidden state without CLS, (N, G*G, D)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.encoder(x)[:, 1:]


class CLIPVisionTower(nn.Cell):
    """Holds ``vision_model`` so parameter names read ``vision_tower.vision_model.*``."""

    def __init__(self, cfg: VisionConfig, num_layers: int, dtype=ms.float32, linear: LinearFactory | None = None,
                 attention_op=None):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg, num_layers, dtype, linear, attention_op)

    def construct(self, pixel_values):
        return self.vision_model(pixel_values)
