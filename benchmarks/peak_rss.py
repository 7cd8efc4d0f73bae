"""Run a command and write its peak resident set size (and exit status) as JSON.

    python benchmarks/peak_rss.py OUT.json -- COMMAND [ARGS...]

Why a separate small process: Linux adds the *pre-exec* memory of a child (a copy of its
parent's, up to the fork) into the child's ``ru_maxrss``, so a large benchmark process that
forks a command would see its own size reported as the command's peak. Forked from this
small process instead, the command's ``ru_maxrss`` (from ``wait4``, which covers the command
and the children it waited for) is its own. The command's stdout and stderr pass through.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out, command = argv[0], argv[2:]
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(out, "w") as f:
        json.dump({"returncode": code, "peak_rss_bytes": usage.ru_maxrss * 1024}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
