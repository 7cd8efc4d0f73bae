"""The project's own CPU kernels (``kernels/*.cc``), built with the machine's C++ compiler on
first use and run as MindSpore "aot" custom ops: attention for decode steps and prefill
chunks (RoPE included), projections by weights kept in half precision, RMSNorm and the MLP's
activation, and the copy of a prompt's leading cache rows from one slot to another.

Why: the KV cache is stored in 2-D blocks so that its rows are written in place, and
MindSpore's CPU backend copies such a written Parameter to reshape it for ``BatchMatMul``
(24 copies of 16.8 MB per 8-stream step at context 512) or gathers a slot's rows into a new
tensor. The attention kernels get the blocks themselves, write the new keys and values at
their positions and read each row's own positions where they lie (a prefill chunk without
ever making its scores); the others replace several small MindSpore ops each, which cost
more to launch than to run at a few rows. See each source for its inputs.

The library is built once per source, flags and CPU into ``~/.cache/pllava/kernels`` (or
``$PLLAVA_KERNEL_CACHE``) with ``$CXX`` (default ``g++``), written under a temporary name and
renamed, so processes racing to build it all end with the same file. Without a compiler
(``PLLAVA_CPU_KERNELS=0`` also turns it off) the model keeps MindSpore's own ops: slower,
same results.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).with_name("kernels")
# -z nodelete: the library stays loaded for the life of the process, as its thread pool does
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17", "-pthread", "-Wl,-z,nodelete")
WHITE_LIST = "MS_CUSTOM_AOT_WHITE_LIST"  # MindSpore runs aot libraries only from under this folder


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("PLLAVA_KERNEL_CACHE", "~/.cache/pllava/kernels")).expanduser()


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n" + "\n".join(wanted)


def kernel_enabled() -> bool:
    """False when ``PLLAVA_CPU_KERNELS`` turns the kernel off (0, false, no, off)."""
    return os.environ.get("PLLAVA_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def kernel_expected() -> bool:
    """Whether a model built now will use the kernel (on the CPU, in fp32): it is on and a
    compiler is there. Part of the compile-cache key, as the graphs differ."""
    return kernel_enabled() and _compiler() is not None


@lru_cache(maxsize=None)
def build_library() -> Path | None:
    """The built kernel library, or None (with one warning) where it cannot be built."""
    if not kernel_enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler (g++ or $CXX) on PATH: attention and projections use MindSpore's "
                    "ops, which copy the KV cache every step (slower, same results)")
        return None
    sources = sorted(KERNEL_DIR.glob("*.cc"))
    text = b"".join(f.read_bytes() for f in sorted(KERNEL_DIR.iterdir()) if f.suffix in (".cc", ".h"))
    key = hashlib.sha256(text + repr((FLAGS, compiler, _cpu_signature())).encode()).hexdigest()[:16]
    folder = kernel_cache_dir()
    target = folder / f"pllava_kernels-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{target.name}.{os.getpid()}"
    try:
        subprocess.run([compiler, *FLAGS, *map(str, sources), "-o", str(partial)], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        log.warning("building the CPU kernels failed, so MindSpore's ops are used: %s",
                    detail.strip()[-2000:])
        partial.unlink(missing_ok=True)
        return None
    log.info("built the CPU kernels: %s", target)
    return target


def _allowed_library() -> Path | None:
    """The built library where MindSpore will load it (its folder white-listed), else None."""
    library = build_library()
    if library is None:
        return None
    allowed = os.environ.get(WHITE_LIST)
    if allowed is None:
        os.environ[WHITE_LIST] = str(library.parent)
    elif not library.resolve().is_relative_to(Path(allowed).resolve()):
        log.warning("%s=%s does not hold %s: attention uses MindSpore's ops", WHITE_LIST, allowed, library)
        return None
    return library


def decode_attention_op(num_heads: int):
    """A ``mindspore.ops.Custom`` running ``DecodeAttention`` (``kernels/decode_attention.cc``:
    RoPE, the cache write and attention of a decode step, from the fused q/k/v projection of
    a model with ``num_heads`` query heads), or None where the kernels cannot be built or
    MindSpore would refuse to load them."""
    return _attention_op("DecodeAttention", num_heads)


def prefill_attention_op(num_heads: int):
    """A ``mindspore.ops.Custom`` running ``PrefillAttention`` (``kernels/prefill_attention.cc``:
    RoPE, the cache write and attention of a prefill chunk over the cache blocks in place), or
    None as for :func:`decode_attention_op`."""
    return _attention_op("PrefillAttention", num_heads)


def full_attention_op():
    """A ``mindspore.ops.Custom`` running ``FullAttention`` (``kernels/full_attention.cc``: the
    vision tower's unmasked attention): q, k, v (N, L, H, D) and scale (1,) -> (N, L, H, D),
    or None as for :func:`decode_attention_op`."""
    return _same_shape_op("FullAttention", lambda q, *rest: q)


def _attention_op(name: str, num_heads: int):
    """qkv (..., heads + 2 kv heads, D) and the rest (see the sources) -> (..., num_heads, D)."""
    library = _allowed_library()
    if library is None:
        return None
    from mindspore import ops

    return ops.Custom(f"{library}:{name}", out_shape=lambda qkv, *rest: list(qkv[:-2]) + [num_heads, qkv[-1]],
                      out_dtype=lambda qkv, *rest: qkv, func_type="aot")


def copy_cache_rows_op():
    """A ``mindspore.ops.Custom`` running ``CopyCacheRows`` (``kernels/copy_rows.cc``): one
    layer's keys and values of positions first..count-1 copied from a cache slot to another
    in place; src, dst, first, count, kv_heads (1,) int32, block_rows (J,) int32, then the
    layer's blocks -> (1,) int32; or None as for :func:`decode_attention_op`."""
    library = _allowed_library()
    if library is None:
        return None
    from mindspore import ops

    return ops.Custom(f"{library}:CopyCacheRows", out_shape=lambda src, *rest: src,
                      out_dtype=lambda src, *rest: src, func_type="aot")


def rms_norm_op():
    """A ``mindspore.ops.Custom`` running ``RmsNorm`` (``kernels/norm_act.cc``): x (..., D),
    weight (D,), eps (1,) -> LLaMA's RMSNorm of x in float32, or None as for
    :func:`decode_attention_op`."""
    return _same_shape_op("RmsNorm", lambda x, *rest: x)


def silu_mul_op():
    """A ``mindspore.ops.Custom`` running ``SiluMul`` (``kernels/norm_act.cc``): the fused
    gate/up projection (..., 2I) -> silu(gate) * up (..., I), or None as for
    :func:`decode_attention_op`."""
    return _same_shape_op("SiluMul", lambda x: list(x[:-1]) + [x[-1] // 2])


def _same_shape_op(name: str, out_shape):
    library = _allowed_library()
    if library is None:
        return None
    from mindspore import ops

    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=lambda x, *rest: x, func_type="aot")


@lru_cache(maxsize=None)
def half_linear_vectorized() -> bool:
    """Whether the built ``HalfLinear`` runs vector code (AVX-512 here); without it the kernel
    gives the same results far slower than MindSpore's float32 matmul."""
    library = build_library()
    if library is None:
        return False
    import ctypes

    return bool(ctypes.CDLL(str(library)).HalfLinearVectorized())


@lru_cache(maxsize=None)
def half_linear_tiles() -> bool:
    """Whether the built ``HalfLinear`` runs calls of 64 rows or more (prefill chunks, frames)
    on the CPU's AMX tiles: built where the compiler targets them (``-march=native`` on a CPU
    with AMX-BF16) and allowed by the OS for this process."""
    library = build_library()
    if library is None:
        return False
    import ctypes

    return bool(ctypes.CDLL(str(library)).HalfLinearTiles())


def tile_product_ns(count: int = 2_000_000) -> float | None:
    """Nanoseconds per AMX tile product over ``count`` of them on this thread now (None where
    :func:`half_linear_tiles` is False): the share of its core's tile unit this process gets,
    which prompt projections follow (the benchmark samples it beside its TTFT runs)."""
    if not half_linear_tiles():
        return None
    import ctypes

    probe = ctypes.CDLL(str(build_library())).TileProductNs
    probe.restype, probe.argtypes = ctypes.c_double, [ctypes.c_int64]
    ns = probe(count)
    return ns if ns > 0 else None


def half_linear_op():
    """A ``mindspore.ops.Custom`` running ``HalfLinear`` (``kernels/half_linear.cc``): x (M, K)
    float32 and a weight kept in float16 or bfloat16, packed in panels of 32 output columns
    (P, K, 32) (:func:`pllava.layers.pack_panels`) -> x W^T (M, 32 P) in float32; or None as
    for :func:`decode_attention_op`."""
    library = _allowed_library()
    if library is None:
        return None
    from mindspore import ops

    return ops.Custom(f"{library}:HalfLinear", out_shape=lambda x, w: [x[0], w[0] * w[2]],
                      out_dtype=lambda x, w: x, func_type="aot")
