"""Device and dtype selection: one place that turns user settings into a ``Backend``."""
from __future__ import annotations

import contextlib
from pathlib import Path

import mindspore as ms

from .cpu_kernels import KERNEL_DIR, kernel_expected
from .layers import Backend

DEVICES = ("CPU", "GPU", "Ascend")
DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def default_dtype(device: str) -> str:
    """fp32 on CPU (MindSpore's fp16 CPU kernels are slow and bf16 matmul is missing there);
    bf16 on Ascend, the dtype PLLaVA was trained and released in; fp16 on GPU."""
    return {"CPU": "float32", "Ascend": "bfloat16", "GPU": "float16"}[device]


def setup_backend(device: str = "CPU", device_id: int = 0, dtype: str | None = None) -> Backend:
    """Point MindSpore at ``device`` and return the kernel/dtype choice for it."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if device == "CPU" and dtype == "bfloat16":
        raise ValueError("dtype bfloat16 is not usable on CPU: MindSpore has no bf16 MatMul kernel there; "
                         "use float32 (or float16, which runs but slowly)")
    try:
        ms.set_device(device, device_id)
    except RuntimeError as exc:
        # Already started in this process on the same device is fine; anything else (no such
        # device in this MindSpore build, a switch after start) is the user's to fix.
        if ms.get_context("device_target") != device:
            reason = str(exc).strip().splitlines()[0]
            raise ValueError(f"cannot run on {device}: {reason}") from None
    if device == "CPU":
        # Eager (PyNative) ops, as the vision tower runs, launch synchronously: on a CPU the
        # asynchronous launch queue only adds hand-offs (16 frames through CLIP 512x8:
        # 7.5 s against 13.7 s, measured); compiled graphs run at the same speed either way.
        ms.runtime.launch_blocking()
    return Backend(device=device, dtype=DTYPES[dtype])


#: the modules whose code becomes the decoder's compiled graphs: these and every CPU kernel
GRAPH_SOURCES = ("llama.py", "layers.py", "model.py", "shapes.py", "config.py", "cpu_kernels.py") + tuple(
    f"{KERNEL_DIR.name}/{f.name}" for f in sorted(KERNEL_DIR.iterdir()) if f.suffix in (".cc", ".h"))


def enable_compile_cache(root: str | Path, *key_parts) -> Path:
    """Keep compiled graphs in a folder keyed by ``key_parts`` (everything that shapes the
    graphs: the model config, the engine's shapes, dtype, device) and the MindSpore and
    project versions, so that a restart with the same setup skips the front-end compile
    (measured 3-4 s per graph cold, 0.3-0.7 s cached). The key also covers whether the CPU
    kernel is used (:mod:`pllava.cpu_kernels`) and the source of the modules that define the
    graphs: MindSpore's own check of source files let a graph of an earlier cache layout
    load after the layout changed (a Reshape size error at warm-up)."""
    import hashlib
    import os

    from . import __version__

    here = Path(__file__).parent
    sources = b"".join((here / name).read_bytes() for name in GRAPH_SOURCES)
    key = repr((ms.__version__, __version__, hashlib.sha256(sources).hexdigest(), kernel_expected())
               + tuple(key_parts)).encode()
    folder = Path(root).expanduser() / hashlib.sha256(key).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    effective = os.access in os.supports_effective_ids
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=effective):  # e.g. written by root, run unprivileged
        raise PermissionError(f"{folder} is not writable by this user (uid {os.geteuid()}; it belongs to uid "
                              f"{folder.stat().st_uid})")
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    os.environ["MS_COMPILER_CACHE_PATH"] = str(folder)
    return folder


@contextlib.contextmanager
def compile_cache_lock(folder: Path | None):
    """Hold the cache folder while compiling: a second process with the same setup waits,
    then reads what the first one wrote instead of racing it."""
    if folder is None:
        yield
        return
    import fcntl

    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def dtype_name(dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
