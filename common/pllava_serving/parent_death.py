"""Make a child process end when its parent does, however the parent ends (``kill -9`` too).

A server killed with SIGKILL cannot stop its children itself: without this, every ``kill -9``
of an encoder left its video-worker processes and multiprocessing's resource tracker running
for good. Two mechanisms, because each alone has a gap:

- Linux ``prctl(PR_SET_PDEATHSIG)``: the kernel signals the child the moment its parent
  (strictly: the parent *thread* that started it) exits;
- where ``prctl`` is not available, a watchdog thread that checks every ``poll_s`` seconds
  whether the child has been handed to another parent (``os.getppid()`` changed), on any
  POSIX system; and a check right after ``prctl`` catches a parent that died before it.

Never both: a server takes a second SIGTERM as "stop now", so the kernel's signal and a
watchdog's would cut its drain short.

Only the standard library: video workers import this and never MindSpore or grpc.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import MutableMapping

PR_SET_PDEATHSIG = 1
PARENT_ENV = "PLLAVA_DIE_WITH_PARENT"  # "PID:SIGNAL", set by parent_death_env


def _load_prctl():
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


def parent_death_env(sig: int = signal.SIGTERM) -> dict[str, str]:
    """Environment for a child started with ``subprocess``: it calls
    :func:`die_with_parent_from_env` first thing and so gets ``sig`` when this process dies.

    The child sets this up itself, after exec, rather than in a ``preexec_fn``: a
    ``preexec_fn`` makes Python fork (not vfork) and run the at-fork hooks, and gRPC's hook
    restarts its poller thread in the child, which then aborts on the epoll descriptor that
    ``close_fds`` closes before exec (the child dies with SIGABRT before it runs a line).
    """
    return {PARENT_ENV: f"{os.getpid()}:{int(sig)}"}


def die_with_parent_from_env(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Call first thing in a child started with :func:`parent_death_env`'s variable: end this
    process when that parent ends. The variable is removed, so this process's own children do
    not inherit a parent that is not theirs. False (nothing done) when it is not set."""
    value = environ.pop(PARENT_ENV, None)
    if not value:
        return False
    try:
        pid, sig = (int(part) for part in value.split(":"))
    except ValueError:
        raise ValueError(f"{PARENT_ENV}={value!r}: expected PID:SIGNAL") from None
    die_with_parent(pid, sig=sig)
    return True


def die_with_parent(parent_pid: int, *, sig: int = signal.SIGKILL, poll_s: float = 1.0) -> None:
    """Call first thing in a child of ``parent_pid``: end this process when that parent ends.

    ``sig`` is what the kernel sends (Linux); without ``prctl`` the watchdog sends it
    (SIGTERM lets a server drain), or exits with status 1 when ``sig`` is SIGKILL.
    """
    def orphaned() -> None:
        if sig == signal.SIGKILL:
            os._exit(1)
        os.kill(os.getpid(), sig)

    armed = set_parent_death_signal(sig)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        orphaned()
        return
    if armed:  # the kernel sends the one signal
        return

    def watch() -> None:
        event = threading.Event()
        while not event.wait(poll_s):
            if os.getppid() != parent_pid:
                orphaned()
                return

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
