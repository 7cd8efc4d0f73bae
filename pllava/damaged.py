"""What to tell a user whose checkpoint file cannot be read: a clone without git-lfs leaves
small text pointers where the weights, the tokenizer and even JSON files should be, and an
interrupted download leaves a truncated file."""
from __future__ import annotations

from pathlib import Path

_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def damage_hint(path: str | Path) -> str:
    """A sentence on the likely cause, to append to an error naming ``path``."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError:
        return ""
    if head == _LFS_POINTER:
        return (f"; it is a git-lfs pointer, not the file itself: run `git lfs pull` in {Path(path).parent} "
                "(or download the checkpoint again)")
    return "; the file may be damaged or cut short: download it again"
