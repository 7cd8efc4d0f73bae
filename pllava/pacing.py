"""How long a prefill chunk may be while other streams are decoding.

Between two tokens of a running stream the engine runs one prefill chunk of the prompt it is
admitting and one decode step, so a stream's wait is the chunk's time plus the step's. A
fixed short chunk keeps that wait small but feeds a long prompt slowly (a 32-token chunk
feeds about 0.6x the tokens per second of a 256-token one on CPU, and every chunk costs a
decode step of every stream), so the engine takes the longest compiled chunk whose time
fits the wait allowed: ``max_gap_steps`` decode steps in all. Times are measured, not
estimated: each prefill graph is timed at warm-up, then every chunk and step the engine runs
updates a moving average, so the choice follows the machine's load.
"""
from __future__ import annotations


class AdmissionPacer:
    """Decides, from measured times, which long chunks may run while streams decode.

    ``seconds`` maps ("prefill", size, context) to a chunk's time (the language model's
    warm-up timings; kept up to date here). A chunk not timed yet is not allowed until it has
    run once while nothing else decoded."""

    def __init__(self, seconds: dict | None = None, max_gap_steps: float = 3.5, smoothing: float = 0.3):
        if max_gap_steps < 1:
            raise ValueError(f"max_gap_steps must be at least 1 (one decode step), got {max_gap_steps}")
        self.seconds = {} if seconds is None else seconds
        self.max_gap_steps = max_gap_steps
        self.smoothing = smoothing  # weight of the newest sample in each moving average
        self.step_s: float | None = None  # a decode step of the running streams, averaged

    def allows(self, size: int, context: int) -> bool:
        """May a chunk of ``size`` at ``context`` run before the next decode step?"""
        chunk = self.seconds.get(("prefill", size, context))
        if chunk is None or self.step_s is None:
            return False
        return chunk + self.step_s <= self.max_gap_steps * self.step_s

    def chunk_ran(self, size: int, context: int, seconds: float) -> None:
        key = ("prefill", size, context)
        self.seconds[key] = self._average(self.seconds.get(key), seconds)

    def step_ran(self, seconds: float) -> None:
        self.step_s = self._average(self.step_s, seconds)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)
