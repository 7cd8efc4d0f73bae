"""Test helper (not a test module): checks of what a process sees of files it may not read.

Root reads and writes everything, so as root these run the code under test as ``nobody``
(uid 65534, the effective uid only, and only inside :func:`as_another_user`); not as root,
the owner is kept out by the files' modes instead (``AS_ROOT`` tells the tests which).
pytest's own temporary folders are mode 0700, which ``nobody`` cannot enter: such checks
build their files in :func:`open_folder`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

AS_ROOT = os.geteuid() == 0
NOBODY = 65534


@contextlib.contextmanager
def open_folder(prefix: str) -> Iterator[Path]:
    """A new folder of mode 0755 under the system's temporary folder, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        folder.chmod(0o700)
        shutil.rmtree(folder)


@contextlib.contextmanager
def as_another_user() -> Iterator[int]:
    """Run the block as ``nobody`` when root (as this user otherwise); yields the uid the
    block runs as."""
    if not AS_ROOT:
        yield os.geteuid()
        return
    os.seteuid(NOBODY)
    try:
        yield NOBODY
    finally:
        os.seteuid(0)
