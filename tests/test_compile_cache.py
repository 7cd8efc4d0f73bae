"""The compile cache folder is keyed by everything that shapes the graphs, the graphs' own
source included, so a changed engine never loads graphs compiled from an older one."""
from __future__ import annotations

import pytest

from other_user import as_another_user, open_folder
from pllava import runtime


def test_folder_follows_the_setup_and_the_graph_sources(tmp_path, monkeypatch):
    for name in ("MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"):
        monkeypatch.setenv(name, "")  # restored after the test
    first = runtime.enable_compile_cache(tmp_path, "config", 8, 4096)
    assert runtime.enable_compile_cache(tmp_path, "config", 8, 4096) == first and first.is_dir()
    assert runtime.enable_compile_cache(tmp_path, "config", 8, 2048) != first
    monkeypatch.setattr(runtime, "GRAPH_SOURCES", runtime.GRAPH_SOURCES[:-1])
    assert runtime.enable_compile_cache(tmp_path, "config", 8, 4096) != first


def test_every_cpu_kernel_source_is_a_graph_source():
    from pllava.cpu_kernels import KERNEL_DIR

    kernels = {f"kernels/{f.name}" for f in KERNEL_DIR.iterdir() if f.suffix in (".cc", ".h")}
    assert {"kernels/prefill_attention.cc", "kernels/parallel.h"} <= kernels <= set(runtime.GRAPH_SOURCES)


def test_a_cache_folder_this_user_cannot_write_is_refused_not_used(monkeypatch):
    """A compose volume written by root, the decoder now unprivileged: the folder is there
    but not writable. It used to be taken, and the first lock file in it crashed the decoder
    at every start; now it is refused (the server logs "no compile cache" and compiles)."""
    for name in ("MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"):
        monkeypatch.setenv(name, "")
    with open_folder("pllava-cache-") as root:
        folder = runtime.enable_compile_cache(root, "config", 8, 4096)
        folder.chmod(0o555)
        with as_another_user(), pytest.raises(PermissionError, match=f"{folder} is not writable by this user"):
            runtime.enable_compile_cache(root, "config", 8, 4096)
