"""Tensor <-> TensorMeta/TensorChunk codec: round trips, chunking, bfloat16, validation."""
import zlib

import numpy as np
import pytest


from pllava_client import codec
from pllava_client.codec import (MAX_CHUNK_BYTES, TensorAssembler, bf16_bits_to_float32,
                                 chunks_to_tensor, encode_tensor, float32_to_bf16_bits,
                                 tensor_meta, tensor_to_chunks)
from pllava_proto.v1 import pllava_pb2


def roundtrip(array, dtype=None):
    meta, chunks = encode_tensor(array, dtype)
    # Through the wire format, as a stream of serialized messages would be.
    meta = pllava_pb2.TensorMeta.FromString(meta.SerializeToString())
    chunks = [pllava_pb2.TensorChunk.FromString(c.SerializeToString()) for c in chunks]
    return meta, chunks, chunks_to_tensor(meta, chunks)


def test_max_chunk_is_one_mib():
    assert MAX_CHUNK_BYTES == 1 << 20 == 1048576


@pytest.mark.parametrize("np_dtype,wire", [
    (np.float32, pllava_pb2.DTYPE_FLOAT32),
    (np.float16, pllava_pb2.DTYPE_FLOAT16),
    (np.int32, pllava_pb2.DTYPE_INT32),
    (np.int64, pllava_pb2.DTYPE_INT64),
    (np.uint8, pllava_pb2.DTYPE_UINT8),
])
def test_roundtrip_small(np_dtype, wire):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 5, 7)) * 100).astype(np_dtype)
    meta, chunks, back = roundtrip(a)
    assert meta.dtype == wire
    assert list(meta.shape) == [3, 5, 7]
    assert meta.nbytes == a.nbytes
    assert len(chunks) == 1
    assert back.dtype == np.dtype(np_dtype) and back.shape == a.shape
    np.testing.assert_array_equal(back, a)


def test_roundtrip_bf16_bits():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    bits = float32_to_bf16_bits(x)
    meta, _, back = roundtrip(bits, dtype=pllava_pb2.DTYPE_BFLOAT16)
    assert meta.dtype == pllava_pb2.DTYPE_BFLOAT16 and meta.nbytes == x.size * 2
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, bits)
    # float32 input with dtype=bf16 is rounded on the way out; names work as dtypes too.
    _, _, back2 = roundtrip(x, dtype="bfloat16")
    np.testing.assert_array_equal(back2, bits)
    np.testing.assert_allclose(bf16_bits_to_float32(back2), x, rtol=2 ** -8)


def test_large_tensor_is_split_into_chunks_of_at_most_one_mib():
    # 1,536,000 fp16 values = ~2.93 MiB: three chunks, the last one partial.
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 1000, 768)).astype(np.float16)
    meta, chunks, back = roundtrip(a)
    assert meta.nbytes == a.nbytes > 2 * MAX_CHUNK_BYTES
    assert len(chunks) == -(-a.nbytes // MAX_CHUNK_BYTES) == 3
    assert all(len(c.data) <= MAX_CHUNK_BYTES for c in chunks)
    assert [c.offset for c in chunks] == [0, MAX_CHUNK_BYTES, 2 * MAX_CHUNK_BYTES]
    assert sum(len(c.data) for c in chunks) == a.nbytes
    # Every chunk message stays well inside gRPC's 4 MiB default.
    assert all(c.ByteSize() < MAX_CHUNK_BYTES + 64 for c in chunks)
    np.testing.assert_array_equal(back, a)
    # Little-endian raw bytes, C order.
    assert b"".join(c.data for c in chunks) == a.astype("<f2").tobytes(order="C")


def test_large_float32_and_bf16_roundtrip():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((576, 1024)).astype(np.float32)  # 2.25 MiB
    _, chunks, back = roundtrip(a)
    assert len(chunks) == 3
    np.testing.assert_array_equal(back, a)
    meta, chunks, bits = roundtrip(a, dtype=pllava_pb2.DTYPE_BFLOAT16)
    assert len(chunks) == 2 and meta.nbytes == a.size * 2
    np.testing.assert_array_equal(bits, float32_to_bf16_bits(a))


def test_non_contiguous_big_endian_and_scalar_inputs():
    a = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2]
    _, _, back = roundtrip(a)
    assert back.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(back, a)
    _, chunks, back = roundtrip(np.float32(2.5))
    assert back.shape == () and back == 2.5 and len(chunks) == 1
    meta, chunks, back = roundtrip(np.zeros((0, 8), np.float32))
    assert chunks == [] and meta.nbytes == 0 and back.shape == (0, 8)


def test_chunk_size_option_and_crc():
    a = np.arange(1000, dtype=np.int32)
    chunks = list(tensor_to_chunks(a, chunk_bytes=1000))
    assert [len(c.data) for c in chunks] == [1000, 1000, 1000, 1000]
    assert all(c.crc32 == zlib.crc32(c.data) for c in chunks)
    np.testing.assert_array_equal(chunks_to_tensor(tensor_meta(a), chunks), a)
    with pytest.raises(ValueError):
        list(tensor_to_chunks(a, chunk_bytes=MAX_CHUNK_BYTES + 1))


# --- bfloat16 against PyTorch ---------------------------------------------------------

def _torch_bf16_bits(x):
    import torch

    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(4)
    specials = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan,
                         np.finfo(np.float32).max, -np.finfo(np.float32).max,
                         np.finfo(np.float32).tiny, 1e-45, -1e-45, 3e38, 65504.0], np.float32)
    # Ties: values exactly halfway between two bfloat16 neighbours (both parities), and the
    # patterns just above / below them.
    base = rng.integers(0, 0x7F7F, 2000, dtype=np.uint32) << 16
    ties = np.concatenate([base | 0x8000, base | 0x18000, base | 0x7FFF, base | 0x8001,
                           base | 0x1FFFF, (base | 0x8000) | 0x80000000]).view(np.float32)
    random_bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    normal = (rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)).astype(np.float32)
    x = np.concatenate([specials, ties, random_bits, normal])
    ours = float32_to_bf16_bits(x)
    theirs = _torch_bf16_bits(x)
    assert float32_to_bf16_bits(np.float32(1.00390625)).shape == ()
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_bits_to_float32(ours[nan])).all()
    assert np.isnan(bf16_bits_to_float32(theirs[nan])).all()


def test_bf16_to_float32_matches_torch():
    import torch

    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    ours = bf16_bits_to_float32(bits)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


# --- validation ---------------------------------------------------------------------

def _parts(nbytes_target=3 * MAX_CHUNK_BYTES // 2):
    a = np.arange(nbytes_target // 4, dtype=np.float32)
    meta, chunks = encode_tensor(a)
    return a, meta, list(chunks)


def test_missing_chunk_raises():
    a, meta, chunks = _parts()
    assert len(chunks) == 2
    with pytest.raises(ValueError, match="incomplete"):
        chunks_to_tensor(meta, chunks[:1])               # last chunk missing
    with pytest.raises(ValueError, match="missing, repeated or out of order"):
        chunks_to_tensor(meta, chunks[1:])               # first chunk missing
    with pytest.raises(ValueError, match="incomplete"):
        chunks_to_tensor(meta, [])


def test_out_of_order_and_repeated_chunks_raise():
    _, meta, chunks = _parts()
    with pytest.raises(ValueError, match="out of order"):
        chunks_to_tensor(meta, chunks[::-1])
    with pytest.raises(ValueError, match="out of order"):
        chunks_to_tensor(meta, [chunks[0], chunks[0], chunks[1]])


def test_corrupted_chunk_raises():
    _, meta, chunks = _parts()
    bad = pllava_pb2.TensorChunk()
    bad.CopyFrom(chunks[1])
    data = bytearray(bad.data)
    data[123] ^= 0x01
    bad.data = bytes(data)
    with pytest.raises(ValueError, match="corrupted"):
        chunks_to_tensor(meta, [chunks[0], bad])
    # A chunk that overruns the declared size.
    long = pllava_pb2.TensorChunk(offset=chunks[1].offset, data=chunks[1].data + b"\0\0\0\0")
    with pytest.raises(ValueError, match="past the declared size"):
        chunks_to_tensor(meta, [chunks[0], long])
    # A chunk above the 1 MiB limit.
    big = np.zeros(MAX_CHUNK_BYTES + 4, np.uint8)
    huge = pllava_pb2.TensorChunk(offset=0, data=big.tobytes())
    with pytest.raises(ValueError, match="limit"):
        chunks_to_tensor(tensor_meta(big), [huge])


def test_shape_bytes_mismatch_raises():
    a, meta, chunks = _parts()
    wrong = pllava_pb2.TensorMeta()
    wrong.CopyFrom(meta)
    wrong.shape[0] += 1
    with pytest.raises(ValueError, match="needs"):
        chunks_to_tensor(wrong, chunks)
    wrong.CopyFrom(meta)
    wrong.nbytes -= 4
    with pytest.raises(ValueError, match="needs"):
        TensorAssembler(wrong)
    wrong = pllava_pb2.TensorMeta(dtype=pllava_pb2.DTYPE_FLOAT32, shape=[-1, 4], nbytes=16)
    with pytest.raises(ValueError, match="negative"):
        TensorAssembler(wrong)
    with pytest.raises(ValueError, match="exceeds the limit"):
        TensorAssembler(meta, max_bytes=meta.nbytes - 1)


def test_unknown_dtype_raises():
    meta = pllava_pb2.TensorMeta(dtype=pllava_pb2.DTYPE_UNSPECIFIED, shape=[2], nbytes=8)
    with pytest.raises(ValueError, match="DTYPE_UNSPECIFIED"):
        TensorAssembler(meta)
    meta = pllava_pb2.TensorMeta.FromString(
        pllava_pb2.TensorMeta(shape=[2], nbytes=8).SerializeToString() + b"\x08\x63")  # dtype=99
    assert meta.dtype == 99
    with pytest.raises(ValueError, match="unknown or unsupported tensor dtype 99"):
        chunks_to_tensor(meta, [])
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        list(tensor_to_chunks(np.zeros(2, np.float32), dtype="float8"))
    with pytest.raises(ValueError, match="DTYPE_BFLOAT16"):
        tensor_meta(np.zeros(2, np.uint16))           # uint16 is ambiguous without dtype=
    with pytest.raises(ValueError, match="no wire dtype"):
        tensor_meta(np.zeros(2, np.float64))
    with pytest.raises(ValueError, match="unsafe"):
        tensor_meta(np.zeros(2, np.float32), dtype=pllava_pb2.DTYPE_INT32)


def test_narrower_integers_are_sent_only_when_every_value_fits():
    """int64 -> int32 is a "same kind" cast, which wraps values outside int32 silently."""
    fits = np.array([2 ** 31 - 1, -2 ** 31, 0], np.int64)
    meta, _, back = roundtrip(fits, dtype=pllava_pb2.DTYPE_INT32)
    assert meta.dtype == pllava_pb2.DTYPE_INT32 and back.tolist() == fits.tolist()
    with pytest.raises(ValueError, match=r"int64 array as DTYPE_INT32: values -1\.\.1099511627776 lie outside"):
        encode_tensor(np.array([2 ** 40, -1], np.int64), pllava_pb2.DTYPE_INT32)
    with pytest.raises(ValueError, match="outside 0..255"):
        tensor_meta(np.array([256], np.uint32), dtype=pllava_pb2.DTYPE_UINT8)
    assert tensor_meta(np.zeros((0, 3), np.int64), dtype=pllava_pb2.DTYPE_INT32).nbytes == 0


def test_dtype_names():
    assert codec.to_wire_dtype("DTYPE_FLOAT16") == pllava_pb2.DTYPE_FLOAT16
    assert codec.to_wire_dtype("bf16") == pllava_pb2.DTYPE_BFLOAT16
    assert codec.to_wire_dtype(np.float32) == pllava_pb2.DTYPE_FLOAT32
    assert codec.dtype_name(pllava_pb2.DTYPE_BFLOAT16) == "bfloat16"
    assert codec.numpy_dtype("bfloat16") == np.dtype("<u2")
