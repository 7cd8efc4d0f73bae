"""Whole lines to a terminal that several threads write to (``pllava up``'s stderr).

``print`` writes a line's text and its newline in two calls, so the log readers of two
servers could interleave (``...stoppedencoder-0 | ...``). Every writer here goes through one
lock and one write per line.
"""
from __future__ import annotations

import threading
from typing import TextIO

_LOCK = threading.Lock()


def write_line(stream: TextIO, text: str) -> None:
    """Write ``text`` and a newline to ``stream`` as one piece, then flush it."""
    with _LOCK:
        stream.write(text + "\n")
        stream.flush()
