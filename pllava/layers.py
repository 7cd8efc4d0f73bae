"""Small building blocks shared by the vision tower and the language model.

Parameter names follow the HF checkpoints (``weight``/``bias``), so loading is a name lookup.
Ops are picked by measured CPU speed and support in MindSpore 2.10: ``ops.MatMul`` with
``transpose_b`` (``mint.nn.Linear`` is ~35x slower on CPU), and a fused RMSNorm: the
device's where it has one (``Backend.fused_rms_norm``), the project's kernel on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from .cpu_kernels import rms_norm_op


@dataclass(frozen=True)
class Backend:
    """Per-device choice of kernels. CPU has no fused RMSNorm kernel; Ascend and GPU do."""

    device: str = "CPU"
    dtype: ms.dtype = ms.float32
    #: (projection kind, float16 / bfloat16) for the language model's projections whose
    #: weights are kept in half precision, as the checkpoint stores them; the others keep the
    #: compute dtype (see ``pllava.llama.linear_setup``)
    half_weights: tuple[tuple[str, ms.dtype], ...] = ()

    @property
    def cpu_kernels(self) -> bool:
        """Whether the project's CPU kernels (:mod:`pllava.cpu_kernels`) may run here: on the
        CPU in float32 (each still falls back to MindSpore's ops where it is not built)."""
        return self.device == "CPU" and self.dtype == ms.float32

    @property
    def fused_rms_norm(self) -> bool:
        return self.device == "Ascend"

    @property
    def weight_first_rows(self) -> tuple[int, int] | None:
        """Inputs of this many rows (inclusive range) run a linear layer as ``W x^T`` (see
        :class:`Linear`); None: always ``x W^T``. On the CPU, decode batches and the 32-row
        prefill chunks that enter a prompt while others decode: swapped, a 32-row chunk ran
        1.3-1.5x faster (at context 4096 239 -> 185 ms); their graphs keep ~0.16 GiB more,
        which the KV cache's lazily resident pages left room for."""
        return (2, 32) if self.device == "CPU" else None


def new_param(shape, dtype, name: str) -> Parameter:
    """A parameter that the weight loader fills; zeros only matter if nothing loads it."""
    return Parameter(initializer("zeros", tuple(shape), dtype), name=name, requires_grad=False)


class Linear(nn.Cell):
    """y = x W^T + b with W stored (out, in) as in HF and ``nn.Dense``. On CPU that layout
    (``MatMul(transpose_b=True)``) beat W stored (in, out) in the language model, measured
    interleaved in one process: prefill chunks of 256 and 32 rows 1.17x and 1.14x, a decode
    step of 8 streams 1.12x, of 1 stream the same.

    MindSpore 2.10's CPU kernel for ``x W^T`` is slow for a few rows, though: for 8-32 rows
    of 1024 wide into 5632, 2-3x slower than for one row per row, and than torch. ``W x^T``
    (the weight as the left operand, the same ``MatMul(transpose_b=True)``) and a transpose
    of the small result run those at torch's speed: an 8-stream decode step 1.26x faster, a
    32-row prefill chunk 1.4x. The row count is static in a compiled graph, so each graph
    takes one form: ``weight_first_rows`` (``Backend.weight_first_rows``) is the range of
    row counts that take the swapped one. Each swapped graph keeps more memory (decode graphs
    0.09 GiB in all on the benchmark model).

    ``half_op`` (:func:`pllava.cpu_kernels.half_linear_op`) with a float16 or bfloat16
    ``dtype``: the weight is kept in that dtype, packed in panels (:func:`pack_panels`; the
    loader packs it), and the op computes ``x W^T`` in float32 from it at any row count."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype,
                 weight_first_rows: tuple[int, int] | None = None, half_op=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.half_op = half_op
        shape = panel_shape(out_features, in_features) if half_op is not None else (out_features, in_features)
        self.weight = new_param(shape, dtype, "weight")
        self.bias = new_param((out_features,), ms.float32 if half_op is not None else dtype, "bias") if bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.weight_first = weight_first_rows or (0, -1)

    @property
    def packed(self) -> bool:
        """Whether the weight is kept in panels (half precision, read by ``half_op``)."""
        return self.half_op is not None

    def construct(self, x):
        lead = x.shape[:-1]
        rows = x.size // self.in_features
        if self.half_op is not None:
            y = self.half_op(x.reshape(-1, self.in_features), self.weight)
            if y.shape[1] != self.out_features:  # the last panel's zero columns
                y = y[:, :self.out_features]
        elif self.weight_first[0] <= rows <= self.weight_first[1]:
            y = self.matmul(self.weight, x.reshape(-1, self.in_features)).transpose(1, 0)
        else:
            y = self.matmul(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(lead + (self.out_features,))


#: makes a projection: (in_features, out_features, bias) -> Linear
LinearFactory = Callable[[int, int, bool], "Linear"]


def plain_linears(dtype) -> LinearFactory:
    """Projections with ``dtype`` weights and MindSpore's matmul."""
    return lambda in_features, out_features, bias: Linear(in_features, out_features, bias, dtype)


def half_linears(dtype, half_op) -> LinearFactory:
    """Projections whose weights stay in the half ``dtype`` the checkpoint stores, packed in
    panels and multiplied in float32 by ``half_op`` (:func:`pllava.cpu_kernels.half_linear_op`)."""
    return lambda in_features, out_features, bias: Linear(in_features, out_features, bias, dtype, half_op=half_op)


#: output columns per panel of a packed weight (``kernels/half_linear.cc``)
PANEL = 32


def panel_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    return (-(-out_features // PANEL), in_features, PANEL)


def pack_panels(weight: np.ndarray) -> np.ndarray:
    """(N, K) -> (ceil(N / 32), K, 32): panel p holds W[32p + j, k] at [p, k, j], zeros past N.
    The kernel then reads each panel's weights of one k as two contiguous vectors."""
    n, k = weight.shape
    padded = np.zeros((panel_shape(n, k)[0] * PANEL, k), weight.dtype)
    padded[:n] = weight
    return np.ascontiguousarray(padded.reshape(-1, PANEL, k).transpose(0, 2, 1))


def unpack_panels(panels: np.ndarray, out_features: int) -> np.ndarray:
    """The inverse of :func:`pack_panels`."""
    return panels.transpose(0, 2, 1).reshape(-1, panels.shape[1])[:out_features]


class FusedLinear(Linear):
    """Several projections of the same input as one matmul (q/k/v, gate/up): fewer, larger
    kernels and fewer graph nodes to compile. ``parts`` maps each checkpoint name (a sibling
    of this cell, e.g. ``q_proj``) to its output width, in output order; ``split`` returns
    the parts' outputs."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool, dtype,
                 weight_first_rows: tuple[int, int] | None = None, half_op=None):
        super().__init__(in_features, sum(parts.values()), bias, dtype, weight_first_rows, half_op)
        self.parts = dict(parts)
        self.sizes = tuple(parts.values())


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor goes: rows [start, stop) of parameter ``param``'s output
    axis (one part of a fused projection)."""

    param: str
    start: int
    stop: int


def packed_weights(cell: nn.Cell) -> dict[str, int]:
    """Parameter names (relative to ``cell``) of weights kept in panels -> their output
    width: the loader packs what the checkpoint holds as (N, K)."""
    return {f"{name}.weight" if name else "weight": sub.out_features
            for name, sub in cell.cells_and_names() if isinstance(sub, Linear) and sub.packed}


def checkpoint_placements(cell: nn.Cell) -> dict[str, Placement]:
    """Checkpoint names (relative to ``cell``) that do not map one-to-one onto a parameter
    of the same name: the parts of fused projections."""
    out: dict[str, Placement] = {}
    for name, sub in cell.cells_and_names():
        if isinstance(sub, FusedLinear):
            parent = name.rsplit(".", 1)[0] + "." if "." in name else ""
            start = 0
            for part, width in sub.parts.items():
                out[f"{parent}{part}.weight"] = Placement(f"{name}.weight", start, start + width)
                if sub.bias is not None:
                    out[f"{parent}{part}.bias"] = Placement(f"{name}.bias", start, start + width)
                start += width
    return out


def checkpoint_tensors(cell: nn.Cell, skip=lambda name: False) -> dict[str, np.ndarray]:
    """The cell's weights under checkpoint names (the inverse of what the loader does), for
    checks and conversions."""
    packed = packed_weights(cell)
    params = {name: unpack_panels(p.asnumpy(), packed[name]) if name in packed else p.asnumpy()
              for name, p in cell.parameters_and_names() if not skip(name)}
    placements = checkpoint_placements(cell)
    out = {ckpt_name: params[place.param][place.start:place.stop] for ckpt_name, place in placements.items()}
    placed = {p.param for p in placements.values()}
    out.update({name: value for name, value in params.items() if name not in placed})
    return out


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
    """LLaMA RMSNorm: normalise in fp32 with eps inside the rsqrt, cast back, then scale. On
    the CPU in fp32 one call of the project's kernel (``kernels/norm_act.cc``) where it is
    built, in place of six MindSpore ops."""

    def __init__(self, dim: int, eps: float, backend: Backend):
        super().__init__()
        self.eps = eps
        self.fused = backend.fused_rms_norm
        self.weight = new_param((dim,), backend.dtype, "weight")
        self.kernel = rms_norm_op() if backend.cpu_kernels else None
        self.eps_tensor = Tensor(np.array([eps], np.float32))

    def construct(self, x):
        if self.fused:
            return ops.rms_norm(x, self.weight, self.eps)[0]
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps_tensor)
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


def rotate_half_matrix(head_dim: int) -> np.ndarray:
    """R with x @ R == concat(-x[half:], x[:half]) (HF's rotate_half), exactly: one +-1 per
    column. One small matmul in place of two slices, a negation and a concat."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), dtype=np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def to_tensor(array: np.ndarray, dtype=None) -> Tensor:
    return Tensor(np.ascontiguousarray(array), dtype=dtype)
