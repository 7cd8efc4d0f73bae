"""The fixed shapes the language model runs at, so that every graph is compiled at warm-up.

A decode step runs the live sequences padded to a *batch bucket* and reads their cache up to
a *context bucket* that covers the longest of them. A prompt is prefilled in chunks that
attend over the cache up to the context bucket of the chunk's end: long chunks (up to
``prefill_chunk``, with chunk x context under ``prefill_area``) when nothing else is
decoding, short ones (``prefill_small_chunk``) for a prompt's tail, and while other
sequences decode, the longest that keeps their wait between tokens short (the caller's
``allow``). Every (batch, context) and (chunk, context) pair is known in advance:
``graphs()`` lists them for warm-up.

With ``attention_in_place`` (the CPU kernels: a chunk reads each row's own positions where
they lie and never makes its scores) a chunk's memory does not grow with its context, so
every chunk size, from ``prefill_small_chunk`` doubling up to ``prefill_chunk``, serves
every context, and a chunk may cross a context bucket; its ``context`` is then the bucket
of its end, which its time is measured and paced by.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

#: ``allow(size, context)``: may a prefill chunk of ``size`` tokens at ``context`` run now?
ChunkFilter = Callable[[int, int], bool]


def short_only(size: int, context: int) -> bool:
    """A ``ChunkFilter`` that allows no long chunk: every chunk is a short one."""
    return False


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
    prefill_chunk: int = 256  # the longest prefill chunk (tokens), used while nothing else decodes
    prefill_small_chunk: int = 16  # prompt tails, and the shortest chunk while other sequences are decoding
    prefill_area: int = 128 * 1024  # chunk x context cap for long chunks (their compute and memory)
    chunk_align: int = 16  # chunk lengths are multiples of this (and at least this)
    # beside decoding streams a shortest chunk may run in this many steps, each through a
    # share of the layers (1 = whole only)
    small_chunk_parts: int = 2
    attention_in_place: bool = False  # chunks read the cache in place: every size at every context

    def __post_init__(self):
        if self.num_slots < 1 or self.max_len < 2:
            raise ValueError(f"need at least 1 slot and 2 positions, got {self.num_slots} x {self.max_len}")
        for name in ("prefill_chunk", "prefill_small_chunk"):
            value = getattr(self, name)
            if value < self.chunk_align or value % self.chunk_align:
                raise ValueError(f"{name} must be a positive multiple of {self.chunk_align}, got {value}")
        if self.small_chunk_parts < 1:
            raise ValueError(f"small_chunk_parts must be at least 1 (1 = whole chunks only), "
                             f"got {self.small_chunk_parts}")
        if self.min_context < 1 or self.prefill_area < self.chunk_align:
            raise ValueError("min_context and prefill_area must be positive")

    @cached_property
    def batch_buckets(self) -> tuple[int, ...]:
        """1 (a lone stream gathers its own rows) and every slot (in slot order, attending
        over the cache in place). A bucket between them would read about what the full one
        does (gathering n slots' rows costs about what reading 2n in place does) and would
        cost its compiles and their memory: each graph keeps ~30-80 MB on CPU. With the CPU
        kernels (no gather) it would save little: on the serving-scale checkpoint at
        position 400, 3 or 4 streams at a batch of 4 took 25.5-27.3 ms a step against
        27.0-29.4 at 8, 2 streams at a batch of 2 21.7-22.8 against 25.3-26.5; one stream
        18.3-19.0 at 1 against 23.8-24.6 at 8 (each bucket also costs a decode graph and a
        mixed graph per chunk size and part)."""
        return tuple(sorted({1, self.num_slots}))

    @cached_property
    def context_buckets(self) -> tuple[int, ...]:
        return powers_of_two(min(self.min_context, self.max_len), self.max_len)

    def batch_bucket(self, n: int) -> int:
        return smallest_at_least(self.batch_buckets, n, "batch")

    def context_bucket(self, n: int) -> int:
        return smallest_at_least(self.context_buckets, n, "context")

    def chunk_size(self, context: int) -> int:
        """The long chunk used with a context bucket: the longest the area cap allows."""
        if self.attention_in_place:
            return self.prefill_chunk
        size = min(self.prefill_chunk, self.prefill_area // context, context)
        return max(self.chunk_align, size // self.chunk_align * self.chunk_align)

    def small_chunk_size(self, context: int) -> int:
        return min(self.prefill_small_chunk, self.chunk_size(context))

    def chunk_sizes(self, context: int) -> tuple[int, ...]:
        """The compiled chunk sizes at a context bucket, longest first."""
        if self.attention_in_place:
            return tuple(reversed(powers_of_two(self.prefill_small_chunk, self.prefill_chunk)))
        return tuple(sorted({self.chunk_size(context), self.small_chunk_size(context)}, reverse=True))

    def next_chunk(self, start: int, length: int, allow: ChunkFilter | None = None) -> Chunk:
        """The chunk that feeds prompt positions from ``start`` on: as long as allowed at the
        smallest context bucket that holds it. ``allow(size, context)`` says which long sizes
        may run now (while others decode: those that keep their wait short); None allows every
        size, and the short one is always allowed. A short chunk is also taken when the
        positions left cost less as short ones (a chunk costs about a pass over the weights,
        counted as one short chunk of tokens, plus its padded size). In place, the longest
        size allowed at the bucket where it would end, then the shortest size that holds the
        positions it takes (the least padding)."""
        if self.attention_in_place:
            return self._next_chunk_in_place(start, length, allow)
        best = None
        for context in self.context_buckets:
            if context <= start:
                continue
            small = self.small_chunk_size(context)
            size = next(s for s in self.chunk_sizes(context) if s == small or allow is None or allow(s, context))
            take = min(length - start, size, context - start)
            if best is None or take > best.length:
                best = Chunk(start, take, size, context)
        small = self.small_chunk_size(best.context)
        if best.size > small and -(-best.length // small) * 2 * small < small + best.size:
            best = Chunk(best.start, min(best.length, small), small, best.context)
        return best

    def _next_chunk_in_place(self, start: int, length: int, allow: ChunkFilter | None) -> Chunk:
        sizes = self.chunk_sizes(0)
        for size in sizes:
            if size == sizes[-1] or allow is None or allow(size, self.context_bucket(min(length, start + size))):
                break
        take = min(length - start, size)
        size = min(s for s in sizes if s >= take)
        return Chunk(start, take, size, self.context_bucket(start + take))

    def chunks(self, length: int, start: int = 0, allow: ChunkFilter | None = None) -> list[Chunk]:
        """Split prompt positions [start, length) into chunks (as ``next_chunk`` picks them)."""
        out = []
        while start < length:
            out.append(self.next_chunk(start, length, allow))
            start += out[-1].length
        return out

    def graphs(self, decode_contexts: tuple[int, ...] | None = None) -> list[tuple[str, int, int]]:
        """Every decode and prefill shape a step can take: ("decode", batch, context) and
        ("prefill", chunk, context); ``decode_contexts``: the contexts decode runs at (default
        every context bucket). The steps of a chunk and decode rows in one call are the
        language model's to add (``PllavaLanguage.warm_up``)."""
        contexts = self.context_buckets if decode_contexts is None else decode_contexts
        decode = [("decode", b, c) for c in contexts for b in self.batch_buckets]
        prefill = []
        for c in self.context_buckets:
            prefill.extend(("prefill", size, c) for size in self.chunk_sizes(c))
        return decode + prefill


@dataclass(frozen=True)
class DecodeCost:
    """What one decode step costs at each (batch bucket, context bucket) of a plan, so the
    engine can run a step as two groups (short sequences at a short context, long ones at
    theirs) when that costs less than one step at the longest context. The estimate is the
    bytes a step reads: the weights once, then the KV rows it attends over; at the batch of
    every slot it attends over the cache in place (every slot's rows), at a smaller batch it
    gathers its slots' rows first (read, written and read again: counted twice). A fixed
    estimate, not a timing: steps timed at warm-up on a busy machine ordered buckets wrongly.

    With ``live_rows`` (the CPU decode kernel) a step reads each sequence's own positions, not
    its bucket's, so two steps read everything one would plus the weights again: it never
    splits."""

    plan: ShapePlan
    table: dict[tuple[int, int], float]
    margin: float = 0.9  # split only when two steps cost under this share of one
    live_rows: bool = False
    weight_bytes: float = 0.0
    kv_bytes_per_position: float = 0.0

    @classmethod
    def estimate(cls, plan: ShapePlan, weight_bytes: float, kv_bytes_per_position: float,
                 live_rows: bool = False) -> "DecodeCost":
        def rows(batch: int) -> int:
            return plan.num_slots if batch == plan.num_slots else 2 * batch

        table = {(b, c): weight_bytes + rows(b) * c * kv_bytes_per_position
                 for b in plan.batch_buckets for c in plan.context_buckets}
        return cls(plan, table, live_rows=live_rows, weight_bytes=weight_bytes,
                   kv_bytes_per_position=kv_bytes_per_position)

    def reads(self, lengths) -> float:
        """Bytes one step of sequences needing ``lengths`` positions reads: with
        ``live_rows`` the weights and each sequence's own rows, else its buckets' step."""
        if self.live_rows:
            return self.weight_bytes + sum(lengths) * self.kv_bytes_per_position
        return self.step(len(lengths), max(lengths))

    def step(self, n: int, longest: int) -> float:
        """One step of ``n`` sequences whose furthest needs ``longest`` positions."""
        return self.table[(self.plan.batch_bucket(n), self.plan.context_bucket(longest))]

    def best_split(self, lengths) -> int:
        """``lengths``: positions each sequence needs, ascending. Returns k: run the first k
        as one step and the rest as another (0 = one step for all)."""
        n = len(lengths)
        if n < 2 or self.live_rows:
            return 0
        whole = self.step(n, lengths[-1])
        best, best_cost = 0, whole * self.margin
        for k in range(1, n):
            if self.plan.context_bucket(lengths[k - 1]) == self.plan.context_bucket(lengths[-1]):
                break
            cost = self.step(k, lengths[k - 1]) + self.step(n - k, lengths[-1])
            if cost < best_cost:
                best, best_cost = k, cost
        return best


def smallest_at_least(buckets: tuple[int, ...], n: int, what: str) -> int:
    """The first of ascending ``buckets`` that holds ``n``; ValueError past the last."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} of {n} exceeds the largest bucket {buckets[-1]}")
