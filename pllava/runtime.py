"""Device and dtype selection: one place that turns user settings into a ``Backend``."""
from __future__ import annotations

import mindspore as ms

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
    return Backend(device=device, dtype=DTYPES[dtype])


def dtype_name(dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
