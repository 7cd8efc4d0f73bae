"""The KV cache costs resident memory only where rows are written."""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from pllava.layers import to_tensor
from pllava.llama import zeros_parameter

ROWS, WIDTH = 1 << 20, 64  # 256 MiB of fp32


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class WriteRead(nn.Cell):
    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def construct(self, rows, values, read):
        written = ops.scatter_update(self.cache, rows, values)
        return ops.gather(written, read, 0)


def test_a_cache_block_is_zero_and_resident_only_where_written():
    before = rss_bytes()
    cache = zeros_parameter((ROWS, WIDTH), ms.float32, "k_cache.0")
    assert tuple(cache.shape) == (ROWS, WIDTH)
    assert rss_bytes() - before < 32 << 20  # 256 MiB allocated, almost none of it resident

    step = ms.jit(WriteRead(cache).construct)
    rows = np.array([3, ROWS // 2, ROWS - 1], np.int32)
    values = np.arange(3 * WIDTH, dtype=np.float32).reshape(3, WIDTH) + 1
    read = np.array([3, ROWS // 2, ROWS - 1, 0, 7, ROWS - 2], np.int32)
    out = step(to_tensor(rows), to_tensor(values), to_tensor(read)).asnumpy()
    np.testing.assert_array_equal(out[:3], values)  # the writes landed
    np.testing.assert_array_equal(out[3:], 0)  # the rest reads as zeros
    # a second step sees the first one's writes: the graph wrote the Parameter in place
    again = step(to_tensor(rows[:1]), to_tensor(values[:1] * 2), to_tensor(read)).asnumpy()
    np.testing.assert_array_equal(again[0], values[0] * 2)
    np.testing.assert_array_equal(again[1:3], values[1:])
    assert rss_bytes() - before < 96 << 20  # still far from the block's 256 MiB


def test_other_dtypes_get_a_zeroed_block():
    cache = zeros_parameter((8, 4), ms.float16, "k_cache.0")
    assert cache.dtype == ms.float16
    np.testing.assert_array_equal(cache.asnumpy(), np.zeros((8, 4), np.float16))
