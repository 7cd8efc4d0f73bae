"""Optional bearer tokens: ``Authorization: Bearer <token>`` against a file of accepted ones.

The file holds one token a line (blank lines and ``#`` comments skipped); it is read once at
start-up. Tokens are compared by their SHA-256 digests with :func:`hmac.compare_digest`, every
accepted token each time, so the time taken says nothing about how close a guess was.
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


class BearerTokens:
    """The accepted tokens; :meth:`allows` checks an ``Authorization`` header."""

    def __init__(self, tokens: list[str]):
        if not tokens:
            raise ValueError("no tokens given: an auth token file needs at least one token line")
        self._digests = [_digest(t) for t in tokens]

    @classmethod
    def from_file(cls, path: str | Path) -> "BearerTokens":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"auth token file {path}: cannot be read ({exc.strerror or exc})") from None
        tokens = [line.strip() for line in text.splitlines()]
        tokens = [t for t in tokens if t and not t.startswith("#")]
        if not tokens:
            raise ValueError(f"auth token file {path} holds no token (one a line, # for comments)")
        return cls(tokens)

    def allows(self, authorization: str | None) -> bool:
        """True if ``authorization`` is ``Bearer <an accepted token>``."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        offered = _digest(token.strip())
        matched = False
        for digest in self._digests:  # no early exit
            matched |= hmac.compare_digest(digest, offered)
        return matched and scheme.lower() == "bearer"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
