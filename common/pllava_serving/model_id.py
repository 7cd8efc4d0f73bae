"""A model identifier that is the same on every replica that loads the same checkpoint.

The decoder compares an encoder's ``model_id`` with its own before using its visual tokens,
and keys its visual-token cache by it, so both servers must compute it the same way: here.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".json")


def model_id(model_path: str | Path, lora_alpha: float) -> str:
    """``<checkpoint name>-<12 hex digits>``.

    The digest covers ``config.json``, the names and sizes of the weight files (reading
    14 GB of weights to hash them would slow every start-up) and ``lora_alpha``, which
    changes the merged weights of a PEFT checkpoint. The folder's location is left out, so
    a copy mounted elsewhere (another container) gets the same id.
    """
    path = Path(model_path)
    folder = path.parent if path.is_file() else path
    digest = hashlib.sha256()
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.exists() else b"")
    files = [path] if path.is_file() else sorted(p for p in folder.iterdir()
                                                 if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    for f in files:
        digest.update(f"{f.name}:{f.stat().st_size}\n".encode())
    digest.update(f"lora_alpha={float(lora_alpha)!r}".encode())
    name = (path.stem if path.is_file() else folder.name) or "model"
    return f"{name}-{digest.hexdigest()[:12]}"
