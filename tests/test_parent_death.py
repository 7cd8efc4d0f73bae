"""A child started with ``parent_death_env`` ends when its parent ends: real processes, the
kernel's parent-death signal and the watchdog's fallback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pllava_serving.parent_death import PARENT_ENV, die_with_parent_from_env, parent_death_env

# What the grandchild runs: set up from the environment, say whether the variable is gone,
# then wait for a signal and write which one came.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pllava_serving.parent_death import PARENT_ENV, die_with_parent_from_env
    out = sys.argv[1]
    def on_signal(sig, frame):
        with open(out, "a") as f:
            f.write(f"signal {sig}\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_signal)
    set_up = die_with_parent_from_env()
    with open(out, "a") as f:
        f.write(f"set up {set_up}; variable left: {PARENT_ENV in os.environ}\\n")
    time.sleep(60)
""")

# The intermediate parent: starts the grandchild with the variable, waits until it has set
# itself up, then exits.
PARENT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from pllava_serving.parent_death import parent_death_env
    child, out = sys.argv[1], sys.argv[2]
    subprocess.Popen([sys.executable, "-c", child, out], env={**os.environ, **parent_death_env(signal.SIGTERM)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "set up" not in (open(out).read() if os.path.exists(out) else ""):
        time.sleep(0.05)
""")


def wait_for(path: Path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = path.read_text() if path.exists() else ""
        if text in found:
            return found
        time.sleep(0.05)
    return path.read_text() if path.exists() else ""


def test_a_child_gets_its_signal_when_its_parent_exits(tmp_path):
    out = tmp_path / "child.log"
    parent = subprocess.run([sys.executable, "-c", PARENT, CHILD, str(out)], timeout=120)
    assert parent.returncode == 0
    log = wait_for(out, f"signal {int(signal.SIGTERM)}")
    assert "set up True; variable left: False" in log, log
    assert f"signal {int(signal.SIGTERM)}" in log, f"the child outlived its parent:\n{log}"


# A server draining: it notes every SIGTERM and takes 3 s (three watchdog polls) to exit.
DRAINING_CHILD = CHILD.replace("    sys.exit(0)\n", "    signal.signal(signal.SIGALRM, lambda *a: sys.exit(0))\n"
                                                     "    signal.alarm(3)\n")


def test_a_draining_child_gets_one_signal_not_a_second_that_cuts_its_drain_short(tmp_path):
    """A server takes a second SIGTERM as "stop now": the kernel's signal and the watchdog's
    must not both come."""
    assert DRAINING_CHILD != CHILD
    out = tmp_path / "child.log"
    parent = subprocess.run([sys.executable, "-c", PARENT, DRAINING_CHILD, str(out)], timeout=120)
    assert parent.returncode == 0
    wait_for(out, f"signal {int(signal.SIGTERM)}")
    time.sleep(4)  # past the child's exit
    log = out.read_text()
    assert log.count(f"signal {int(signal.SIGTERM)}") == 1, log


def test_a_child_whose_parent_is_already_gone_ends_at_once(tmp_path):
    out = tmp_path / "child.log"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                      # a pid that is not this child's parent any more
    env = {**os.environ, PARENT_ENV: f"{gone.pid}:{int(signal.SIGTERM)}"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, timeout=60)
    assert child.returncode == 0     # its SIGTERM handler ran and exited
    assert f"signal {int(signal.SIGTERM)}" in out.read_text()


def test_without_the_variable_nothing_is_set_up():
    assert die_with_parent_from_env({}) is False


def test_a_malformed_variable_is_refused():
    with pytest.raises(ValueError, match="PID:SIGNAL"):
        die_with_parent_from_env({PARENT_ENV: "not-a-pid"})
