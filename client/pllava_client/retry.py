"""When a caption call that failed before its first response is made again, and after how long.

The client retries a ``Caption`` call itself instead of through a gRPC service-config retry
policy: with one, a server-streaming call whose decoder was killed after taking it, with no
other decoder to go to, was seen waiting forever in grpcio 1.62-1.85 (deadline included),
once the retry attempts ran out.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import grpc

#: Trailing metadata by which a server says how long to wait before trying again, in
#: milliseconds; negative: do not try again (gRPC's name, which the servers set).
PUSHBACK_KEY = "grpc-retry-pushback-ms"


@dataclass(frozen=True)
class CaptionRetry:
    """A call that fails with UNAVAILABLE before anything was received (the decoder is loading,
    draining, restarting, was killed or cannot be reached) is made again, on whichever decoder
    the channel picks, up to ``attempts`` in all. The pause before retry ``n`` is random below
    ``first_pause_s * multiplier ** (n - 1)``, capped at ``max_pause_s``: by default below 0.2,
    0.4, 0.8 and 1.6 s, at most 3 s in all, so an unreachable decoder is reported within
    seconds."""

    attempts: int = 5
    first_pause_s: float = 0.2
    max_pause_s: float = 1.6
    multiplier: float = 2.0

    def pause_s(self, failed_attempts: int, code: grpc.StatusCode | None,
                trailing: Sequence[tuple[str, str]] | None) -> float | None:
        """Seconds to wait before the next attempt after ``failed_attempts`` failed, the last
        with ``code`` and ``trailing`` metadata; None: do not try again."""
        if code != grpc.StatusCode.UNAVAILABLE or failed_attempts >= self.attempts:
            return None
        pushback = _pushback_ms(trailing)
        if pushback is not None:
            return None if pushback < 0 else pushback / 1000
        return random.uniform(0, min(self.max_pause_s, self.first_pause_s * self.multiplier ** (failed_attempts - 1)))


def _pushback_ms(trailing: Sequence[tuple[str, str]] | None) -> int | None:
    for key, value in trailing or ():
        if key == PUSHBACK_KEY:
            try:
                return int(value)
            except (TypeError, ValueError):
                return -1  # unreadable: do what a careful server means, no retry
    return None
