"""NumPy arrays <-> ``pllava.v1`` tensor messages.

A tensor travels as one :class:`TensorMeta` (dtype, shape, total byte count) followed by
:class:`TensorChunk` messages carrying its raw little-endian, C-order bytes, each at most
:data:`MAX_CHUNK_BYTES` (1 MiB) long, in order, with its byte offset and a CRC-32.

Sending::

    meta, chunks = encode_tensor(tokens, dtype=pllava_pb2.DTYPE_BFLOAT16)
    yield EncodeResponse(header=EncodeHeader(visual_tokens=meta, ...))
    for chunk in chunks:
        yield EncodeResponse(chunk=chunk)

Receiving::

    assembler = TensorAssembler(header.visual_tokens)
    for response in stream:            # the chunks after the header
        assembler.add(response.chunk)
    tokens = assembler.finish()        # np.ndarray; ValueError on anything inconsistent

bfloat16: NumPy has no such type, so a ``DTYPE_BFLOAT16`` tensor is a ``uint16`` array of
bit patterns on the NumPy side; :func:`float32_to_bf16_bits` / :func:`bf16_bits_to_float32`
convert (round to nearest, ties to even, as PyTorch does). Arrays of an ``ml_dtypes``-style
``bfloat16`` dtype are accepted on the sending side as they are.

Every problem with received data raises :class:`ValueError` with a message naming it.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterable, Iterator, Union

import numpy as np

from pllava_proto.v1 import pllava_pb2

TensorMeta = pllava_pb2.TensorMeta
TensorChunk = pllava_pb2.TensorChunk

#: Largest ``TensorChunk.data`` a sender produces and a receiver accepts.
MAX_CHUNK_BYTES = 1 << 20
#: Default cap on a received tensor's declared size (guards against absurd allocations).
DEFAULT_MAX_TENSOR_BYTES = 1 << 32

# Wire dtype -> NumPy storage dtype (little-endian). bfloat16 is stored as its uint16 bits.
_NUMPY_DTYPES = {
    pllava_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    pllava_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    pllava_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
    pllava_pb2.DTYPE_INT32: np.dtype("<i4"),
    pllava_pb2.DTYPE_INT64: np.dtype("<i8"),
    pllava_pb2.DTYPE_UINT8: np.dtype("u1"),
}
# NumPy dtype -> wire dtype, for inference when no dtype is given (uint16 is deliberately
# absent: it is ambiguous with bfloat16 bits, so those must name DTYPE_BFLOAT16).
_FROM_NUMPY = {
    np.dtype("float32"): pllava_pb2.DTYPE_FLOAT32,
    np.dtype("float16"): pllava_pb2.DTYPE_FLOAT16,
    np.dtype("int32"): pllava_pb2.DTYPE_INT32,
    np.dtype("int64"): pllava_pb2.DTYPE_INT64,
    np.dtype("uint8"): pllava_pb2.DTYPE_UINT8,
}
_ALIASES = {
    "float32": pllava_pb2.DTYPE_FLOAT32, "fp32": pllava_pb2.DTYPE_FLOAT32,
    "float16": pllava_pb2.DTYPE_FLOAT16, "fp16": pllava_pb2.DTYPE_FLOAT16,
    "half": pllava_pb2.DTYPE_FLOAT16,
    "bfloat16": pllava_pb2.DTYPE_BFLOAT16, "bf16": pllava_pb2.DTYPE_BFLOAT16,
    "int32": pllava_pb2.DTYPE_INT32, "int64": pllava_pb2.DTYPE_INT64,
    "uint8": pllava_pb2.DTYPE_UINT8,
}

DTypeLike = Union[int, str, np.dtype, type, None]


# ---------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------

def dtype_name(dtype: int) -> str:
    """``DTYPE_FLOAT16`` -> ``"float16"`` (the short name used in configs and JSON)."""
    check_dtype(dtype)
    return pllava_pb2.DType.Name(dtype)[len("DTYPE_"):].lower()


def check_dtype(dtype: int) -> int:
    """Return ``dtype`` if it is a supported wire dtype, else raise ValueError."""
    if dtype not in _NUMPY_DTYPES:
        try:
            name = pllava_pb2.DType.Name(dtype)
        except (ValueError, TypeError):
            name = None
        what = f"{name} ({dtype})" if name else repr(dtype)
        raise ValueError(f"unknown or unsupported tensor dtype {what}; expected one of "
                         + ", ".join(pllava_pb2.DType.Name(d) for d in _NUMPY_DTYPES))
    return int(dtype)


def to_wire_dtype(dtype: DTypeLike) -> int:
    """Resolve a dtype given as a ``pllava_pb2.DType`` value, a name (``"DTYPE_BFLOAT16"``,
    ``"bfloat16"``, ``"bf16"``, ``"float16"``, ...) or a NumPy dtype to a ``DType`` value."""
    if isinstance(dtype, str):
        key = dtype.strip()
        if key.upper().startswith("DTYPE_") and key.upper() in pllava_pb2.DType.keys():
            return check_dtype(pllava_pb2.DType.Value(key.upper()))
        if key.lower() in _ALIASES:
            return _ALIASES[key.lower()]
        raise ValueError(f"unknown tensor dtype {dtype!r}; expected one of "
                         + ", ".join(sorted(_ALIASES)))
    if isinstance(dtype, (bool, np.bool_)):
        raise ValueError(f"unknown tensor dtype {dtype!r}")
    if isinstance(dtype, (int, np.integer)):
        return check_dtype(int(dtype))
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown tensor dtype {dtype!r}") from None
    if np_dtype.name == "bfloat16":
        return pllava_pb2.DTYPE_BFLOAT16
    if np_dtype.newbyteorder("=") in _FROM_NUMPY:
        return _FROM_NUMPY[np_dtype.newbyteorder("=")]
    raise ValueError(f"NumPy dtype {np_dtype} has no wire dtype; supported: "
                     + ", ".join(str(d) for d in _FROM_NUMPY)
                     + " (and uint16 bfloat16 bits with dtype=DTYPE_BFLOAT16)")


def numpy_dtype(dtype: DTypeLike) -> np.dtype:
    """The NumPy storage dtype of a wire dtype (``uint16`` for bfloat16)."""
    return _NUMPY_DTYPES[to_wire_dtype(dtype)]


# ---------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------

def float32_to_bf16_bits(x) -> np.ndarray:
    """Round float values to bfloat16; return the bit patterns as a ``uint16`` array.

    Round to nearest, ties to even, overflow to +-inf, every NaN to 0x7FC0 -- the same bits
    ``torch.tensor(x, dtype=torch.float32).to(torch.bfloat16)`` gives. Input of another float
    type is first converted to float32.
    """
    f = np.asarray(x, dtype=np.float32, order="C")
    bits = f.view(np.uint32)
    # No uint32 overflow: the largest non-NaN pattern is 0xFF800000 (-inf) and the bias
    # is at most 0x8000.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out = np.where(nan, np.uint16(0x7FC0), out).astype(np.uint16)
    return out


def bf16_bits_to_float32(bits) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) -> float32 values (exact)."""
    b = np.asarray(bits)
    if b.dtype.name == "bfloat16":
        b = b.view(np.uint16)
    if b.dtype != np.uint16:
        raise ValueError(f"bfloat16 bits must be a uint16 array, got {b.dtype}")
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------------------

def _wire_array(array, dtype: DTypeLike = None) -> tuple[np.ndarray, int]:
    """``array`` as a C-contiguous little-endian array in its wire storage dtype."""
    arr = np.asarray(array)
    if dtype is None:
        wire = to_wire_dtype(arr.dtype)
    else:
        wire = to_wire_dtype(dtype)
    target = _NUMPY_DTYPES[wire]
    if wire == pllava_pb2.DTYPE_BFLOAT16:
        if arr.dtype.name == "bfloat16":          # ml_dtypes-style bfloat16: native bits
            arr = arr.view(np.uint16)
        elif arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
            pass                                   # already bit patterns (any byte order)
        elif np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer):
            arr = float32_to_bf16_bits(arr)
        else:
            raise ValueError(f"cannot send a {arr.dtype} array as DTYPE_BFLOAT16")
    elif arr.dtype != target:
        if arr.dtype.name == "bfloat16":
            arr = bf16_bits_to_float32(arr)
        if not np.can_cast(arr.dtype, target, casting="same_kind"):
            raise ValueError(f"cannot send a {arr.dtype} array as "
                             f"{pllava_pb2.DType.Name(wire)} (unsafe conversion)")
        if np.issubdtype(target, np.integer) and arr.size and not np.can_cast(arr.dtype, target, casting="safe"):
            info = np.iinfo(target)  # a narrower integer type would wrap values it cannot hold
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"cannot send a {arr.dtype} array as {pllava_pb2.DType.Name(wire)}: values "
                                 f"{arr.min()}..{arr.max()} lie outside {info.min}..{info.max}")
    arr = np.asarray(arr, dtype=target, order="C")  # keeps 0-d arrays 0-d
    return arr, wire


def tensor_meta(array, dtype: DTypeLike = None) -> TensorMeta:
    """The :class:`TensorMeta` that announces ``array`` (see :func:`tensor_to_chunks`)."""
    arr, wire = _wire_array(array, dtype)
    return TensorMeta(dtype=wire, shape=list(arr.shape), nbytes=arr.nbytes)


def tensor_to_chunks(array, dtype: DTypeLike = None, *,
                     chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[TensorChunk]:
    """Split ``array`` into :class:`TensorChunk` messages of at most ``chunk_bytes`` bytes.

    ``dtype`` is the wire dtype (a ``DType`` value or a name); ``None`` infers it from the
    array. Arrays are converted when the dtypes differ (float -> bfloat16 rounds to nearest
    even); a ``uint16`` array sent as ``DTYPE_BFLOAT16`` is taken as bit patterns. An empty
    tensor yields no chunks.
    """
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
    arr, _ = _wire_array(array, dtype)
    view = memoryview(arr.reshape(-1).view(np.uint8))
    for start in range(0, arr.nbytes, chunk_bytes):
        data = bytes(view[start:start + chunk_bytes])
        yield TensorChunk(offset=start, data=data, crc32=zlib.crc32(data))


def encode_tensor(array, dtype: DTypeLike = None, *,
                  chunk_bytes: int = MAX_CHUNK_BYTES) -> tuple[TensorMeta, Iterator[TensorChunk]]:
    """``(tensor_meta(array, dtype), tensor_to_chunks(array, dtype))`` converting only once."""
    arr, wire = _wire_array(array, dtype)
    return (TensorMeta(dtype=wire, shape=list(arr.shape), nbytes=arr.nbytes),
            tensor_to_chunks(arr, wire, chunk_bytes=chunk_bytes))


# ---------------------------------------------------------------------------------------
# Receiving
# ---------------------------------------------------------------------------------------

def validate_meta(meta: TensorMeta, *, max_bytes: int | None = DEFAULT_MAX_TENSOR_BYTES) -> np.dtype:
    """Check a received :class:`TensorMeta`; return the NumPy storage dtype."""
    np_dtype = _NUMPY_DTYPES[check_dtype(meta.dtype)]
    shape = list(meta.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {shape} has a negative dimension")
    expected = math.prod(shape) * np_dtype.itemsize
    if meta.nbytes != expected:
        raise ValueError(f"tensor declares {meta.nbytes} bytes but shape {shape} of "
                         f"{pllava_pb2.DType.Name(meta.dtype)} needs {expected} bytes")
    if max_bytes is not None and meta.nbytes > max_bytes:
        raise ValueError(f"tensor of {meta.nbytes} bytes exceeds the limit of {max_bytes} bytes")
    return np_dtype


class TensorAssembler:
    """Rebuilds one tensor from its :class:`TensorMeta` and in-order :class:`TensorChunk` s.

    ``add`` rejects a chunk that is too large, starts anywhere but where the previous one
    ended (missing, repeated or out-of-order chunks), runs past the declared size or fails its
    CRC-32; ``finish`` rejects a tensor whose bytes are incomplete. All with ValueError.
    """

    def __init__(self, meta: TensorMeta, *, max_bytes: int | None = DEFAULT_MAX_TENSOR_BYTES):
        self._np_dtype = validate_meta(meta, max_bytes=max_bytes)
        self.dtype = int(meta.dtype)
        self.shape = tuple(int(d) for d in meta.shape)
        self.nbytes = int(meta.nbytes)
        self._buf = np.empty(self.nbytes, dtype=np.uint8)
        self.received = 0
        self.num_chunks = 0

    @property
    def complete(self) -> bool:
        """True once every declared byte has arrived."""
        return self.received == self.nbytes

    def add(self, chunk: TensorChunk) -> None:
        """Append the next chunk."""
        data = chunk.data
        n = len(data)
        index = self.num_chunks
        if n > MAX_CHUNK_BYTES:
            raise ValueError(f"tensor chunk {index} carries {n} bytes, more than the "
                             f"{MAX_CHUNK_BYTES}-byte limit")
        if chunk.offset != self.received:
            raise ValueError(f"tensor chunk {index} starts at byte {chunk.offset} but "
                             f"{self.received} bytes have arrived: a chunk is missing, "
                             "repeated or out of order")
        if self.received + n > self.nbytes:
            raise ValueError(f"tensor chunk {index} runs to byte {self.received + n}, past the "
                             f"declared size of {self.nbytes} bytes")
        if chunk.HasField("crc32") and zlib.crc32(data) != chunk.crc32:
            raise ValueError(f"tensor chunk {index} (offset {chunk.offset}) is corrupted: "
                             "CRC-32 mismatch")
        self._buf[self.received:self.received + n] = np.frombuffer(data, dtype=np.uint8)
        self.received += n
        self.num_chunks += 1

    def finish(self) -> np.ndarray:
        """The tensor (``uint16`` bit patterns for bfloat16); ValueError if incomplete."""
        if not self.complete:
            raise ValueError(f"tensor incomplete: {self.received} of {self.nbytes} bytes "
                             f"arrived in {self.num_chunks} chunks")
        return self._buf.view(self._np_dtype).reshape(self.shape)


def chunks_to_tensor(meta: TensorMeta, chunks: Iterable[TensorChunk], *,
                     max_bytes: int | None = DEFAULT_MAX_TENSOR_BYTES) -> np.ndarray:
    """Rebuild a tensor from its meta and all of its chunks (see :class:`TensorAssembler`)."""
    assembler = TensorAssembler(meta, max_bytes=max_bytes)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()
