"""Make a child process end when its parent does, however the parent ends (``kill -9`` too).

A server killed with SIGKILL cannot stop its children itself: without this, every ``kill -9``
of an encoder left its video-worker processes and multiprocessing's resource tracker running
for good. Two mechanisms, because each alone has a gap:

- Linux ``prctl(PR_SET_PDEATHSIG)``: the kernel signals the child the moment its parent
  (strictly: the parent *thread* that started it) exits;
- a watchdog thread that checks every ``poll_s`` seconds whether the child has been handed to
  another parent (``os.getppid()`` changed), on any POSIX system, and which also catches a
  parent that died before the child could call ``prctl``.

Only the standard library: video workers import this and never MindSpore or grpc.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1


def _load_prctl():
    # Resolved once at import: a child between fork and exec may only call it, not look it up.
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; False where
    that is not available (not Linux)."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(sig)) == 0


def preexec_parent_death(sig: int = signal.SIGTERM):
    """A ``subprocess.Popen(preexec_fn=...)`` that gives the child ``sig`` when this process
    dies, or None where that is not available."""
    if _PRCTL is None:
        return None

    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        _PRCTL(PR_SET_PDEATHSIG, int(sig))

    return preexec


def die_with_parent(parent_pid: int, *, sig: int = signal.SIGKILL, poll_s: float = 1.0) -> None:
    """Call first thing in a child of ``parent_pid``: end this process when that parent ends.

    ``sig`` is what the kernel sends (Linux); the watchdog exits with status 1 itself.
    """
    set_parent_death_signal(sig)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        event = threading.Event()
        while not event.wait(poll_s):
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
