"""Compile the language model's graphs in a child process, into the compile cache.

Why a child: a graph compiled in the serving process keeps the compiler's leftovers for good.
Measured on the benchmark model (8 slots x 4096, 15 graphs): warm-up compiling in process
added 1.04 GiB of RSS, loading the same graphs from the compile cache added 0.69 GiB
(decode graphs 0.52 -> 0.25 GiB). ``gc``, ``malloc_trim`` and ``ms_memory_recycle`` gave
none of it back. So with a compile cache, a cold start first runs this module in a child,
which builds the same engine shapes without loading weights, runs every graph once (the
cache names graphs by compile order, so the child compiles exactly what ``warm_up`` will,
in the same order) and exits; the server then loads every graph from the cache.

Run by :func:`compile_in_child`; ``python -m pllava.precompile --help`` for the arguments.
The compile cache folder comes from the environment the parent set up
(:func:`pllava.runtime.enable_compile_cache`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

from .shapes import ShapePlan

#: Written into the cache folder once a child has compiled every graph into it.
COMPLETE_MARKER = "precompiled.json"


def is_precompiled(cache_dir: Path) -> bool:
    """Whether a child compiled into ``cache_dir`` for this process's dependency files (a
    changed entry script makes MindSpore compile everything again, so it counts as cold)."""
    try:
        marker = json.loads((cache_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("dependencies") == _digest(_dependency_files())


def _digest(files: list[str] | None) -> str | None:
    if files is None:
        return None
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0")
        try:
            h.update(Path(name).read_bytes())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


def compile_in_child(config_folder: Path, cache_dir: Path, plan: ShapePlan, device: str, device_id: int,
                     dtype: str, timeout_s: float = 3600.0, env: Mapping[str, str] | None = None) -> float:
    """Compile every graph of ``plan`` into ``cache_dir`` in a child process (the caller's
    environment, which points MindSpore at ``cache_dir``, with ``env`` over it, e.g.
    :func:`pllava_serving.parent_death.parent_death_env` to end it with its parent); the
    seconds it took. Raises RuntimeError with the child's last lines if it fails."""
    start = time.perf_counter()
    argv = [sys.executable, "-m", "pllava.precompile", "--config", str(config_folder), "--device", device,
            "--device-id", str(device_id), "--dtype", dtype, "--plan", json.dumps(asdict(plan))]
    dependencies = _dependency_files()
    if dependencies is not None:
        argv += ["--dependency-files", json.dumps(dependencies)]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                            timeout=timeout_s, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"the compile child exited with status {result.returncode}:\n{tail}")
    seconds = time.perf_counter() - start
    marker = {**asdict(plan), "seconds": round(seconds, 1), "dependencies": _digest(dependencies)}
    (cache_dir / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
    return seconds


def _dependency_files() -> list[str] | None:
    """The files MindSpore hashes into this process's cached graphs, or None if this
    MindSpore does not say. It loads a cached graph only where the hash of these files
    matches, and derives them from the entry script, ``sys.path`` and the working directory:
    a child started as ``-m pllava.precompile`` would list other files, and the parent would
    find every graph stale and compile it again. So the parent hands its list to the child."""
    from mindspore.graph import api

    find = getattr(api, "_get_compile_cache_dep_files", None)
    return None if find is None else list(find())


def main(argv: list[str] | None = None) -> int:
    from pllava_serving.parent_death import die_with_parent_from_env

    die_with_parent_from_env()  # a decoder killed while this compiles takes it along
    p = argparse.ArgumentParser(prog="python -m pllava.precompile",
                                description="Compile the decoder's graphs into the compile cache set up in the "
                                            "environment (MS_COMPILER_CACHE_PATH), then exit.")
    p.add_argument("--config", required=True, help="checkpoint folder (its config.json and safetensors headers are read; no weights)")
    p.add_argument("--device", default="CPU")
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--plan", required=True, help="the ShapePlan's fields as JSON")
    p.add_argument("--dependency-files", help="JSON list: the serving process's compile-cache dependency "
                                              "files (see _dependency_files)")
    args = p.parse_args(argv)
    if os.environ.get("MS_COMPILER_CACHE_ENABLE") != "1" or not os.environ.get("MS_COMPILER_CACHE_PATH"):
        p.error("no compile cache in the environment: nothing would be kept")

    from .config import PllavaConfig
    from .model import PllavaLanguage, stored_half_weights
    from .runtime import setup_backend

    if args.dependency_files:
        from mindspore.graph import api

        dependencies = json.loads(args.dependency_files)
        api._get_compile_cache_dep_files = lambda: list(dependencies)
    plan = json.loads(args.plan)
    backend = setup_backend(args.device, args.device_id, args.dtype)
    cfg = PllavaConfig.from_pretrained(Path(args.config))
    # num_slots, max_len and the plan's other fields; weights kept as the checkpoint stores them
    language = PllavaLanguage(cfg, backend, half_weights=stored_half_weights(args.config), **plan)
    language.warm_up(timed=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
