"""The fixed shapes the language model runs at, so that every graph is compiled at warm-up.

A decode step runs the live sequences padded to a *batch bucket* and reads their cache up to
a *context bucket* that covers the longest of them; a prompt is prefilled in chunks whose
length depends on the context bucket of the chunk's end, so that chunk x context (the size
of one layer's attention scores) stays under ``prefill_area``. Every (batch, context) and
(chunk, context) pair is known in advance: ``graphs()`` lists them for warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass


def powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """low, 2*low, ... below high, then high itself."""
    out, n = [], low
    while n < high:
        out.append(n)
        n *= 2
    return tuple(out) + (high,)


@dataclass(frozen=True)
class Chunk:
    """One prefill call: prompt positions [start, start + length) padded to ``size``,
    attending over the first ``context`` cached positions."""

    start: int
    length: int
    size: int
    context: int


@dataclass(frozen=True)
class ShapePlan:
    """Buckets for ``num_slots`` sequences of at most ``max_len`` tokens."""

    num_slots: int
    max_len: int
    min_context: int = 512  # the smallest context bucket; buckets double up to max_len
    prefill_chunk: int = 256  # the longest prefill chunk (tokens)
    prefill_area: int = 1 << 20  # chunk x context cap: bounds the attention scores of one chunk
    chunk_align: int = 32  # chunk lengths are multiples of this (and at least this)

    def __post_init__(self):
        if self.num_slots < 1 or self.max_len < 2:
            raise ValueError(f"need at least 1 slot and 2 positions, got {self.num_slots} x {self.max_len}")
        if self.prefill_chunk < self.chunk_align or self.prefill_chunk % self.chunk_align:
            raise ValueError(f"prefill_chunk must be a positive multiple of {self.chunk_align}, "
                             f"got {self.prefill_chunk}")
        if self.min_context < 1 or self.prefill_area < self.chunk_align:
            raise ValueError("min_context and prefill_area must be positive")

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        return powers_of_two(1, self.num_slots)

    @property
    def context_buckets(self) -> tuple[int, ...]:
        return powers_of_two(min(self.min_context, self.max_len), self.max_len)

    def batch_bucket(self, n: int) -> int:
        return _smallest_at_least(self.batch_buckets, n, "batch")

    def context_bucket(self, n: int) -> int:
        return _smallest_at_least(self.context_buckets, n, "context")

    def chunk_size(self, context: int) -> int:
        """The chunk length used with a context bucket: the longest allowed by the area cap."""
        size = min(self.prefill_chunk, self.prefill_area // context, context)
        return max(self.chunk_align, size // self.chunk_align * self.chunk_align)

    def chunks(self, length: int, start: int = 0) -> list[Chunk]:
        """Split prompt positions [start, length) into chunks, each as long as the area cap
        allows at the smallest context bucket that holds it."""
        out = []
        while start < length:
            best = None
            for context in self.context_buckets:
                if context <= start:
                    continue
                take = min(length - start, self.chunk_size(context), context - start)
                if best is None or take > best.length:
                    best = Chunk(start, take, self.chunk_size(context), context)
            out.append(best)
            start += best.length
        return out

    def graphs(self) -> list[tuple[str, int, int]]:
        """Every shape a step can take: ("decode", batch, context) and ("prefill", chunk, context)."""
        decode = [("decode", b, c) for c in self.context_buckets for b in self.batch_buckets]
        prefill = [("prefill", self.chunk_size(c), c) for c in self.context_buckets]
        return decode + prefill


def _smallest_at_least(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} of {n} exceeds the largest bucket {buckets[-1]}")
