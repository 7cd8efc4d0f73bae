"""PLLaVA's multi-modal projector followed by 3-D adaptive average pooling.

The reference runs linear_1 -> GELU(erf) -> linear_2 on every frame, then
``AdaptiveAvgPool3d(pooling_shape)`` over (frames, h, w). Pooling is linear and its weights
sum to one, so it commutes with the affine linear_2: we pool *before* linear_2 (exact up to
rounding, T*576/T'*144 times less work for linear_2). It never commutes with the GELU.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .layers import LinearFactory, plain_linears, to_tensor


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging matrix with PyTorch AdaptiveAvgPool semantics: bin k averages
    inputs [floor(k*I/O), ceil((k+1)*I/O)), so bins overlap when O does not divide I."""
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for k in range(out_size):
        start = (k * in_size) // out_size
        end = -((-(k + 1) * in_size) // out_size)
        m[k, start:end] = 1.0 / (end - start)
    return m


def frame_repeat_matrix(total_frames: int, num_frames: int) -> np.ndarray:
    """(num_frames, total_frames) selection doing the reference's
    ``x.repeat_interleave(int(num_frames / total_frames) + 1)[:num_frames]`` for short inputs."""
    if total_frames >= num_frames:
        return np.eye(total_frames)
    reps = num_frames // total_frames + 1
    src = np.repeat(np.arange(total_frames), reps)[:num_frames]
    m = np.zeros((num_frames, total_frames))
    m[np.arange(num_frames), src] = 1.0
    return m


class PllavaMultiModalProjector(nn.Cell):
    """(T, G*G, Dv) CLIP features of one video -> (T'*H'*W', Dt) visual tokens, (t, h, w) order."""

    def __init__(self, vision_hidden: int, text_hidden: int, frame_shape, dtype, linear: LinearFactory | None = None):
        super().__init__()
        linear = linear or plain_linears(dtype)
        self.linear_1 = linear(vision_hidden, text_hidden, True)
        self.linear_2 = linear(text_hidden, text_hidden, True)
        self.frame_shape = tuple(frame_shape)
        self.dtype = dtype

    def construct(self, features, num_frames: int, pooling_shape):
        """``features`` holds the frames actually encoded for one video; fewer than
        ``num_frames`` (a still image, a deduplicated short clip) repeat as the reference does."""
        return self.finish(self.per_frame(features), num_frames, pooling_shape)

    def per_frame(self, features):
        """linear_1 -> GELU: the part done on every frame's every patch (the vision tower's
        compiled graph ends with it)."""
        return ops.gelu(self.linear_1(features), approximate="none")

    def finish(self, activations, num_frames: int, pooling_shape):
        """Pool one video's ``per_frame`` output, then linear_2 on the pooled tokens."""
        return self.linear_2(self.pool(activations, num_frames, pooling_shape))

    def pool(self, x, num_frames: int, pooling_shape):
        """Separable pooling: one small averaging matmul per axis (time folds in the
        repeat of short inputs). Computed in fp32 like the MindSpore reference port."""
        t_in = x.shape[0]
        gh, gw = self.frame_shape
        d = x.shape[-1]
        tp, hp, wp = pooling_shape
        frames = max(t_in, num_frames)
        time = adaptive_pool_matrix(frames, tp) @ frame_repeat_matrix(t_in, frames)
        x = x.astype(ms.float32).reshape(t_in, gh * gw * d)
        x = ops.matmul(to_tensor(time, ms.float32), x).reshape(tp * gh, gw * d)
        x = self._pool_axis(x.reshape(tp, gh, gw * d), adaptive_pool_matrix(gh, hp))  # (tp, hp, gw*d)
        x = x.reshape(tp * hp, gw, d)
        x = self._pool_axis(x, adaptive_pool_matrix(gw, wp))  # (tp*hp, wp, d)
        return x.reshape(tp * hp * wp, d).astype(self.dtype)

    @staticmethod
    def _pool_axis(x, matrix):
        """Apply an (out, in) averaging matrix along axis 1 of a (B, in, R) tensor."""
        m = to_tensor(matrix, ms.float32)
        b = x.shape[0]
        return ops.BatchMatMul()(ops.broadcast_to(m.reshape(1, *matrix.shape), (b,) + matrix.shape), x)
