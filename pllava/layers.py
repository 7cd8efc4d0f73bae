"""Small building blocks shared by the vision tower and the language model.

Parameter names follow the HF checkpoints (``weight``/``bias``), so loading is a name lookup.
Ops are picked by measured CPU speed and support in MindSpore 2.10: ``ops.MatMul`` with
``transpose_b`` (``mint.nn.Linear`` is ~35x slower on CPU), and the fused RMSNorm kernel only
where the device has one (``Backend.fused_rms_norm``).
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer


@dataclass(frozen=True)
class Backend:
    """Per-device choice of kernels. CPU has no fused RMSNorm kernel; Ascend and GPU do."""

    device: str = "CPU"
    dtype: ms.dtype = ms.float32

    @property
    def fused_rms_norm(self) -> bool:
        return self.device == "Ascend"

    @property
    def linear_in_out(self) -> bool:
        """Store Linear weights (in, out) and multiply without a transpose: on CPU MindSpore's
        MatMul ran 2x faster that way at 8 and 256 rows (1024x2816, measured); Ascend's
        kernels take the checkpoint's (out, in) layout as is."""
        return self.device == "CPU"


def new_param(shape, dtype, name: str) -> Parameter:
    """A parameter that the weight loader fills; zeros only matter if nothing loads it."""
    return Parameter(initializer("zeros", tuple(shape), dtype), name=name, requires_grad=False)


class Linear(nn.Cell):
    """y = x W^T + b. W is stored (out, in) as in HF and ``nn.Dense``, or (in, out) when
    ``in_out`` (see ``Backend.linear_in_out``); the loader transposes the checkpoint's
    tensor for those (``transposed_weight_names``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, in_out: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.in_out = in_out
        shape = (in_features, out_features) if in_out else (out_features, in_features)
        self.weight = new_param(shape, dtype, "weight")
        self.bias = new_param((out_features,), dtype, "bias") if bias else None
        self.matmul = ops.MatMul(transpose_b=not in_out)

    def construct(self, x):
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(lead + (self.out_features,))


def transposed_weight_names(cell: nn.Cell) -> set[str]:
    """Parameter names (as ``parameters_and_names`` gives them) stored transposed from the
    checkpoint's layout."""
    return {f"{name}.weight" for name, sub in cell.cells_and_names()
            if isinstance(sub, Linear) and sub.in_out}


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with HF parameter names."""

    def __init__(self, dim: int, eps: float, dtype):
        super().__init__()
        self.weight = new_param((dim,), dtype, "weight")
        self.bias = new_param((dim,), dtype, "bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y, _, _ = self.norm(x, self.weight, self.bias)
        return y


class RMSNorm(nn.Cell):
    """LLaMA RMSNorm: normalise in fp32 with eps inside the rsqrt, cast back, then scale."""

    def __init__(self, dim: int, eps: float, backend: Backend):
        super().__init__()
        self.eps = eps
        self.fused = backend.fused_rms_norm
        self.weight = new_param((dim,), backend.dtype, "weight")

    def construct(self, x):
        if self.fused:
            return ops.rms_norm(x, self.weight, self.eps)[0]
        dtype = x.dtype
        h = x.astype(ms.float32)
        variance = (h * h).mean(-1, keep_dims=True)
        h = h * ops.broadcast_to(ops.rsqrt(variance + self.eps), h.shape)
        return h.astype(dtype) * ops.broadcast_to(self.weight, h.shape)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (max_positions, head_dim) for rotate-half RoPE, computed in fp32 like HF."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    t = np.arange(max_positions, dtype=np.float32)
    freqs = np.outer(t, inv_freq).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


def to_tensor(array: np.ndarray, dtype=None) -> Tensor:
    return Tensor(np.ascontiguousarray(array), dtype=dtype)
