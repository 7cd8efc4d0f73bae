"""The generation engine: sequences in KV-cache slots, one prefill or decode step at a time.

``Engine.step()`` feeds one chunk of at most one prompt (admitting a waiting request into a
free slot when no prompt is in progress), then advances every running sequence by one token
in one batched decode (continuous batching: new requests join while others keep decoding,
and a long prompt delays running streams by one chunk per step, not by its whole prefill).
Where the language model can, the chunk and the decode rows run as one call; where even the
shortest chunk is too long a wait, the step runs a part of its layers instead; and while
streams decode, copying a prompt's leading rows from another slot, then merging the prompt
with its visual tokens, is a step's prompt work of its own. Each step returns the tokens it
produced as ``TokenEvent``s, so a caller can stream them. ``generate()`` drives one request
alone.

``add`` and ``cancel`` may be called from other threads; ``step`` runs on one thread only.

Failures stay with the sequences they belong to. A step is shared device work (a prefill
chunk of one prompt, one decode call for the running batch) followed by each sequence's own
host-side work (choosing its token, detokenising, matching its stop strings). An exception in
one sequence's own work, or in the prefill of its prompt, finishes that sequence alone with
``FinishReason.ERROR`` and a :class:`SequenceError` naming what failed; a failed decode call
finishes the sequences that were in it. Either way their slots are freed and the next step
serves everyone else as before.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .pacing import (DEFAULT_MAX_GAP_STEPS, DEFAULT_MAX_GAP_STRETCH, DEFAULT_QUEUED_WEIGHT, AdmissionPacer,
                     queue_stretch)
from .prefix_reuse import leading_text
from .sampling import Sampler, SamplingParams
from .shapes import Chunk
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

#: Makes each request's token chooser: ``(params) -> chooser(logits, seen_ids) -> token id``.
SamplerFactory = Callable[[SamplingParams], Callable[[np.ndarray, np.ndarray], int]]


class FinishReason(str, enum.Enum):
    STOP = "stop"                # the model emitted EOS
    LENGTH = "length"            # max_new_tokens reached
    CONTEXT_LENGTH = "context_length"  # the KV cache (max context) is full
    STOP_STRING = "stop_string"  # a requested stop string appeared in the text
    CANCELLED = "cancelled"      # the caller went away or gave up
    ERROR = "error"              # this sequence failed; the event's ``error`` says why


class ContextOverflowError(ValueError):
    """The prompt (with its visual tokens) does not fit the context window."""


class SequenceError(RuntimeError):
    """Why one sequence ended with ``FinishReason.ERROR``: the stage that failed and the
    exception it raised (also its ``__cause__``). Not the request's fault: validation
    refuses bad requests before they reach the engine."""

    def __init__(self, stage: str, cause: BaseException, batch_size: int = 1):
        self.stage = stage
        self.cause = cause
        shared = f" (shared by the {batch_size} sequences decoded together)" if batch_size > 1 else ""
        lines = str(cause).strip().splitlines()  # the first line only: device errors run to pages
        reason = lines[0][:300] if lines else ""
        super().__init__(f"generation failed while {stage}{shared}: {type(cause).__name__}: {reason}")
        self.__cause__ = cause


@contextlib.contextmanager
def _stage(name: str):
    """Re-raise any exception of the block as a SequenceError naming ``name``."""
    try:
        yield
    except SequenceError:
        raise
    except Exception as exc:
        raise SequenceError(name, exc) from exc


@dataclass
class Request:
    """What the engine needs: prompt ids holding one ``<image>`` id and the visual tokens."""

    prompt_ids: Sequence[int]
    visual: np.ndarray | None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None on a final event that carries no new token (cancel)
    text: str
    finish_reason: FinishReason | None = None
    stats: "SequenceStats | None" = None  # set on the final event
    error: SequenceError | None = None  # set when finish_reason is ERROR


@dataclass
class SequenceStats:
    """Per-request timings in seconds (perf_counter) and sizes, for reports and the wire."""

    added: float = 0.0
    prefill_start: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    prompt_tokens: int = 0  # merged length: text tokens + visual tokens
    reused_tokens: int = 0  # leading prompt positions found in the cache, not prefilled
    generated_tokens: int = 0

    @property
    def queue_s(self) -> float:
        return self.prefill_start - self.added

    @property
    def prefill_s(self) -> float:
        return self.first_token - self.prefill_start


@dataclass(frozen=True)
class StepTimes:
    """What one ``Engine.step()`` ran, for metrics: the prefill chunk and the batched decode
    (seconds of each, model call and sampling included; 0 when that part did not run). A
    step that ran both in one model call reports its time as each."""

    prefill_s: float = 0.0
    prefill_tokens: int = 0  # prompt positions the chunk fed (a chunk run in parts: at its last)
    decode_s: float = 0.0
    decode_batch: int = 0  # sequences the decode advanced by one token
    prefill_part: int = 0  # which part (1, 2, ...) of a chunk run in parts the step ran; 0: none


class StopStringFilter:
    """Holds back text that might be the start of a stop string; reports the first match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class ChunkInParts:
    """A prompt chunk run in several steps beside the decode rows, each through a share of the
    layers (``PllavaLanguage.chunk_layer_parts``): the next part, the chunk's rows after
    the parts run so far, and their seconds."""

    chunk: Chunk
    part: int = 0
    hidden: object = None
    seconds: list[float] = field(default_factory=list)


class Running:
    """A request in flight: its slot, position, generated ids and text state."""

    def __init__(self, request: Request, tokenizer: Tokenizer, sampler: SamplerFactory = Sampler):
        self.request = request
        self.sampler = sampler(request.params)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop_filter = StopStringFilter(request.params.stop)
        self.generated: list[int] = []
        self.seen = np.asarray([i for i in request.prompt_ids], dtype=np.int64)
        self.slot = -1
        self.position = 0  # where the next fed token is written
        self.leading_ids = np.zeros(0, np.int32)  # the prompt ids a slot's rows may already hold
        self.embeds = None  # merged prompt embeddings while the prompt is being prefilled
        self.chunk_parts: ChunkInParts | None = None  # its chunk being run in parts, if one is
        self.prefix_copy: tuple[int, int] | None = None  # (slot, rows): its leading rows still to copy from there
        self.stats = SequenceStats(added=time.perf_counter())


#: leading prompt positions copied from another slot per piece while streams decode
#: (:meth:`Engine._copy_prefix`): ~20 ms into a slot never written before on a 2-core VM
PREFIX_COPY_PIECE = 64


class Engine:
    """Owns a ``PllavaLanguage`` (its KV-cache slots) and schedules requests onto it.

    ``sampler`` makes each request's token chooser from its ``SamplingParams`` (default
    :class:`pllava.sampling.Sampler`): called once per request, the chooser once per token.
    While streams decode, a prompt enters in chunks that keep each stream's wait between two
    tokens under about ``max_gap_steps`` decode steps (:class:`pllava.pacing.AdmissionPacer`),
    up to ``max_gap_stretch`` times that while prompts queue behind it: by a factor 1 +
    ``queued_weight`` x queued prompts / streams decoding (:func:`pllava.pacing.queue_stretch`;
    a stretch of 1 or a weight of 0 = never longer). With ``reuse_prefixes`` a prompt starts
    after the leading text ids whose cache rows a slot still holds (:meth:`_place`), and the
    streams holding the same leading text read it from one slot as they decode
    (``PllavaLanguage.share_prefixes``): the engine records which ids a slot's rows hold.
    ``eos_token_id``: the id, or ids, that end a generation (default: the tokenizer's EOS; the
    servers pass :func:`pllava.config.end_token_ids`)."""

    def __init__(self, language, tokenizer: Tokenizer, eos_token_id: int | Iterable[int] | None = None,
                 sampler: SamplerFactory = Sampler, max_gap_steps: float = DEFAULT_MAX_GAP_STEPS,
                 max_gap_stretch: float = DEFAULT_MAX_GAP_STRETCH, queued_weight: float = DEFAULT_QUEUED_WEIGHT,
                 reuse_prefixes: bool = True):
        if not max_gap_stretch >= 1:
            raise ValueError(f"max_gap_stretch must be at least 1 (1 = never longer), got {max_gap_stretch}")
        if not queued_weight >= 0:
            raise ValueError(f"queued_weight must be at least 0 (0 = never longer), got {queued_weight}")
        self.language = language
        self.tokenizer = tokenizer
        self.sampler = sampler
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        self.num_slots = language.num_slots
        self.max_len = language.max_len
        self.num_visual_tokens = language.cfg.num_visual_tokens
        self._lock = threading.Lock()
        self._waiting: deque[Running] = deque()
        self._cancelled: set[str] = set()
        self._slots: list[Running | None] = [None] * self.num_slots
        self._prefilling: Running | None = None  # holds a slot, its prompt partly in the cache
        self.last_step = StepTimes()  # what the latest step() ran (read by the serving metrics)
        self.pacer = AdmissionPacer(getattr(language, "graph_seconds", None), max_gap_steps)
        self.max_gap_stretch = max_gap_stretch
        self.queued_weight = queued_weight
        self.reuse_prefixes = reuse_prefixes
        # what its slots hold (pllava.prefix_reuse); None: nothing recorded, nothing reused
        self._prefixes = getattr(language, "prefixes", None) if reuse_prefixes else None

    # ---- called from any thread -------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; raises ContextOverflowError when its prompt cannot fit, ValueError
        when it is empty (there would be no logits to choose a first token from)."""
        visual_len = 0 if request.visual is None else len(request.visual)
        prompt_len = len(request.prompt_ids) - (1 if request.visual is not None else 0) + visual_len
        if prompt_len < 1:
            raise ValueError("the prompt is empty (no text or visual tokens): there is nothing to continue")
        if prompt_len >= self.max_len:
            raise ContextOverflowError(
                f"the prompt is {prompt_len} tokens ({len(request.prompt_ids)} text + {visual_len} visual) "
                f"but the context holds {self.max_len}: shorten the prompt or raise the max context")
        seq = Running(request, self.tokenizer, self.sampler)
        seq.stats.prompt_tokens = prompt_len
        image_id = self.language.cfg.image_token_index if request.visual is not None else None
        seq.leading_ids = leading_text(request.prompt_ids, image_id)[:prompt_len - 1]  # (one position left to feed)
        with self._lock:
            self._waiting.append(seq)

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step and free its slot."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_decoding(self) -> int:
        """Sequences past their prompt, generating a token per step."""
        return sum(s is not None and bool(s.generated) for s in self._slots)

    @property
    def kv_positions_in_use(self) -> int:
        """Cache positions written across the held slots."""
        return sum(s.position for s in self._slots if s is not None)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_running > 0 or bool(self._cancelled)

    # ---- engine thread ---------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Cancel, feed one chunk of the admitted prompt (admitting the next waiting one if
        none is in progress; a part of a chunk, a piece of a copy of its leading rows or the
        merge of its prompt, as the module docstring says), then decode one token for every
        running sequence. Running streams therefore wait at most one chunk per token while a
        long prompt enters."""
        events = self._apply_cancellations()
        running = [s for s in self._slots if s is not None and s.generated]
        if self._prefilling is None:
            self._prefilling = self._next_admission()
        feeding = self._prefilling is not None
        if feeding and self._prefilling.prefix_copy is not None:
            # while streams decode, a step that copies cached rows feeds no chunk besides: the
            # pieces take the wait allowed (all at once, and the chunk after, when none decodes)
            feeding = self._copy_prefix(self._prefilling, running) and not running
        if feeding and running and self._prefilling.embeds is None:
            feeding = False  # merging the prompt is this step's prompt work (below)
            self._merge_beside_decoding(self._prefilling, events)
        if feeding and running and self._mixed_sizes:
            mixed = self._mixed_step(self._prefilling, running, events)
            if mixed is not None:
                return events + mixed
        prefill_s = decode_s = 0.0
        prefill_tokens = 0
        if feeding and self._prefilling is not None:
            seq, start = self._prefilling, time.perf_counter()
            before = seq.position
            events.extend(self._prefill_step(seq, running))
            prefill_s, prefill_tokens = time.perf_counter() - start, seq.position - before
        running = [s for s in self._slots if s is not None and s.generated]
        if running:
            start = time.perf_counter()
            load = self._step_load(running)
            events.extend(self._decode(running))
            decode_s = time.perf_counter() - start
            self.pacer.step_ran(decode_s, load)
        self.last_step = StepTimes(prefill_s, prefill_tokens, decode_s, len(running))
        return events

    def _apply_cancellations(self) -> list[TokenEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            kept = deque(s for s in self._waiting if s.request.request_id not in cancelled)
            dropped = [s for s in self._waiting if s.request.request_id in cancelled]
            self._waiting = kept
        events = [self._finish(s, None, "", FinishReason.CANCELLED) for s in dropped]
        for seq in self._slots:
            if seq is not None and seq.request.request_id in cancelled:
                events.append(self._finish(seq, None, "", FinishReason.CANCELLED))
        return events

    def _next_admission(self) -> Running | None:
        with self._lock:
            if not self._waiting or None not in self._slots:
                return None
            seq = self._waiting.popleft()
        seq.slot, seq.position = self._place(seq)
        seq.stats.reused_tokens = seq.position
        self._slots[seq.slot] = seq
        return seq

    def _place(self, seq: Running) -> tuple[int, int]:
        """A free slot for ``seq`` and how many of its leading positions are already there
        (:mod:`pllava.prefix_reuse`): the free slot holding the most of its leading text ids;
        where another slot holds more of them, ``seq.prefix_copy`` says so (their rows are
        copied into it by :meth:`_copy_prefix`)."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        if self._prefixes is None:
            return free[0], 0
        slot, rows = self._prefixes.best(seq.leading_ids, free)
        if getattr(self.language, "copies_prefixes", False):
            source, more = self._prefixes.best(seq.leading_ids, range(self.num_slots))
            if more > rows:
                seq.prefix_copy = (source, more)
        return slot, rows

    def _copy_prefix(self, seq: Running, running: list[Running]) -> bool:
        """Copy the leading rows ``seq.prefix_copy`` names into ``seq``'s slot; whether that is
        done. While streams decode, in pieces of ``PREFIX_COPY_PIECE`` positions, as many as
        fit the wait allowed less a decode step (the first always), the rest at later steps:
        into a slot never written before, whose pages fault at their first write, 260
        positions took 81-87 ms on a 2-core VM (7 ms over written rows), 4-5 steps of a lone
        stream waiting on one copy. A failed copy leaves the rest to be prefilled."""
        source, rows = seq.prefix_copy
        budget = None
        if running:
            step = self.pacer.step_at(self._step_load(running))
            budget = None if step is None else max(0.0, self.pacer.max_gap_steps - 1) * step
        start = time.perf_counter()
        while seq.prefix_copy is not None:
            begun, before = time.perf_counter(), seq.position
            try:
                held = self.language.copy_prefix(source, seq.slot, rows, None if budget is None else PREFIX_COPY_PIECE)
            except Exception as exc:  # noqa: BLE001 - the prompt is then fed from where the copy stopped
                log.warning("copying %d cached prompt positions from slot %d to %d failed (%.300r); "
                            "prefilling them", rows - seq.position, source, seq.slot, exc)
                held = before
            seq.position = seq.stats.reused_tokens = max(before, held)
            if seq.position >= rows or seq.position <= before:
                seq.prefix_copy = None
            elif budget is not None and 2 * time.perf_counter() - start - begun > budget:
                break  # (the next piece, as long as this one, would pass the budget)
        return seq.prefix_copy is None

    def _merge_beside_decoding(self, seq: Running, events: list[TokenEvent]) -> None:
        """Merge ``seq``'s prompt with its visual tokens in a step of its own while streams
        decode, so that no chunk's step waits on it too: 3-12 ms for a 16-frame prompt on a
        2-core VM (a process's first the longest), against a lone stream's 20 ms step and its
        first chunk's 60. A failure is ``seq``'s alone (its ERROR event goes to ``events``)."""
        try:
            self._embed_prompt(seq)
        except SequenceError as error:
            events.append(self._fail(seq, error))

    def _prefill_step(self, seq: Running, running: list[Running]) -> list[TokenEvent]:
        """Feed the next chunk of ``seq``'s prompt (while the ``running`` streams decode, one
        the pacer allows); its last chunk yields the first token. A failure here is ``seq``'s
        alone: the chunk is its own device call and writes only its own slot."""
        busy = bool(running)
        stretch, load = self._gap_stretch(len(running)), self._step_load(running)
        seq.chunk_parts = None  # a chunk left in parts (its streams ended, or a part failed) runs again whole
        try:
            length = self._embed_prompt(seq)
            with _stage("prefilling the prompt"):
                chunk = self.language.plan.next_chunk(
                    seq.position, length,
                    (lambda size, context: self.pacer.allows(size, context, stretch=stretch, load=load))
                    if busy else None)
                start = time.perf_counter()
                logits = self.language.prefill_chunk(seq.slot, seq.embeds, chunk)
        except SequenceError as error:
            return [self._fail(seq, error)]
        self.pacer.chunk_ran(chunk.size, chunk.context, time.perf_counter() - start, busy)
        return self._chunk_done(seq, chunk, length, logits)

    def _embed_prompt(self, seq: Running) -> int:
        """``seq``'s prompt embeddings, made at its first chunk; returns their length."""
        if seq.embeds is None:
            seq.stats.prefill_start = time.perf_counter()
            with _stage("merging the prompt with its visual tokens"):
                seq.embeds = self.language.merge_embeddings(seq.request.prompt_ids, seq.request.visual)
        return seq.embeds.shape[1]

    def _chunk_done(self, seq: Running, chunk, length: int, logits: np.ndarray) -> list[TokenEvent]:
        """After a chunk of ``seq``'s prompt: its first token when the chunk was the last."""
        seq.position = chunk.start + chunk.length
        if self._prefixes is not None:
            self._prefixes.keep(seq.slot, seq.leading_ids, seq.position)
        if seq.position < length:
            return []
        self._prefilling = None
        seq.embeds = None
        seq.stats.first_token = time.perf_counter()  # (before: the first token may also end it)
        return [self._accept(seq, logits[0])]

    def _gap_stretch(self, decoding: int) -> float:
        """How much longer the ``decoding`` streams may wait per token now, given the prompt
        being fed and those with a free slot to enter next (:func:`pllava.pacing.queue_stretch`)."""
        with self._lock:
            waiting = len(self._waiting)
        entering = 1 + min(waiting, self._slots.count(None))
        return queue_stretch(entering, decoding, self.max_gap_stretch, self.queued_weight)

    def _step_load(self, running: list[Running]) -> float:
        """What a decode step of ``running`` reads (``DecodeCost.reads``), by which the pacer
        scales the decode steps it timed to the streams decoding now; 1 for a language
        model without that estimate."""
        cost = getattr(self.language, "decode_cost", None)
        if cost is None or not running:
            return 1.0
        return cost.reads([seq.position + 1 for seq in running])

    @property
    def _mixed_sizes(self) -> tuple[int, ...]:
        """Chunk sizes the language model runs in one step with the decode rows."""
        return getattr(self.language, "mixed_sizes", ())

    def _mixed_step(self, seq: Running, running: list[Running],
                    events: list[TokenEvent]) -> list[TokenEvent] | None:
        """A chunk of ``seq``'s prompt and a token for every running stream in ONE model call
        (the weights read once for both): the streams then wait one such step between two
        tokens, which the pacer keeps under ``max_gap_steps`` decode steps. Where even the
        shortest chunk's step is judged longer, that chunk runs in parts, a share of the
        layers per step (:meth:`_chunk_part_step`). None when the pacer allows a longer
        chunk than the mixed steps take (it runs on its own, then the decode step), when
        that call fails (the two parts are then run apart), and when ``seq`` fails before it
        (merging its prompt, planning its chunk): its ERROR event goes to ``events`` and the
        step decodes the streams alone."""
        sizes, rows = self._mixed_sizes, len(running)
        stretch, load = self._gap_stretch(rows), self._step_load(running)
        if seq.chunk_parts is None:
            try:
                length = self._embed_prompt(seq)
                with _stage("prefilling the prompt"):
                    chunk = self.language.plan.next_chunk(
                        seq.position, length,
                        lambda size, context: self.pacer.allows(size, context, rows if size in sizes else 0, stretch,
                                                                load))
            except SequenceError as error:
                events.append(self._fail(seq, error))  # (no longer prefilling: the step decodes)
                return None
            if chunk.size not in sizes:
                return None
            if (chunk.size == min(sizes) and getattr(self.language, "chunk_layer_parts", ())
                    and self.pacer.judged_too_long(chunk.size, chunk.context, rows, stretch, load)):
                seq.chunk_parts = ChunkInParts(chunk)
        if seq.chunk_parts is not None:
            return self._chunk_part_step(seq, running, load)
        start = time.perf_counter()
        try:
            chunk_logits, logits = self.language.prefill_chunk_and_decode(seq.slot, seq.embeds, chunk,
                                                                          *_decode_rows(running))
        except Exception as exc:  # noqa: BLE001 - retried apart, where a failure is placed
            # The chunk and the decode again as two calls (rewriting the same cache rows with
            # the same values), so that a failure ends only the sequences of the part it is in.
            log.warning("a step of a prompt chunk and %d decode rows failed (%.300r); running them apart",
                        len(running), exc)
            return None
        seconds = time.perf_counter() - start
        self.pacer.chunk_ran(chunk.size, chunk.context, seconds, busy=True, with_decode=rows)
        events = self._accept_decoded(running, logits) + self._chunk_done(seq, chunk, length, chunk_logits)
        self.last_step = StepTimes(seconds, chunk.length, seconds, len(running))
        return events

    def _chunk_part_step(self, seq: Running, running: list[Running], load: float) -> list[TokenEvent] | None:
        """The next part of ``seq``'s chunk run in parts, and a token for every running stream,
        in ONE model call; after the last part the chunk counts for the pacer as the whole step
        it stands for. None when that call fails: the chunk then runs again whole, apart
        (rewriting the rows its earlier parts wrote with the same values)."""
        parts = seq.chunk_parts
        chunk = parts.chunk
        start = time.perf_counter()
        try:
            hidden, chunk_logits, logits = self.language.prefill_chunk_part_and_decode(
                seq.slot, seq.embeds, chunk, parts.part, parts.hidden, *_decode_rows(running))
        except Exception as exc:  # noqa: BLE001 - retried whole and apart, where a failure is placed
            log.warning("part %d of a prompt chunk beside %d decode rows failed (%.300r); running them apart",
                        parts.part + 1, len(running), exc)
            seq.chunk_parts = None
            return None
        seconds = time.perf_counter() - start
        parts.part, parts.hidden = parts.part + 1, hidden
        parts.seconds.append(seconds)
        events = self._accept_decoded(running, logits)
        fed = 0
        if chunk_logits is not None:
            seq.chunk_parts = None
            self.pacer.parts_ran(chunk.size, chunk.context, parts.seconds, len(running), load)
            events += self._chunk_done(seq, chunk, seq.embeds.shape[1], chunk_logits)
            fed = chunk.length
        self.last_step = StepTimes(seconds, fed, seconds, len(running), prefill_part=parts.part)
        return events

    def _decode(self, running: list[Running]) -> list[TokenEvent]:
        try:
            logits = self.language.decode(*_decode_rows(running))
        except Exception as exc:  # the shared device step: every sequence in it has no token
            error = SequenceError("decoding the next token", exc, batch_size=len(running))
            return [self._fail(seq, error) for seq in running]
        return self._accept_decoded(running, logits)

    def _accept_decoded(self, running: list[Running], logits: np.ndarray) -> list[TokenEvent]:
        """Each running sequence's next token from its row of a decode's logits."""
        events = []
        for seq, row in zip(running, logits):
            seq.position += 1
            events.append(self._accept(seq, row))
        return events

    def _accept(self, seq: Running, logits: np.ndarray) -> TokenEvent:
        """Sample a token for ``seq``, update its text, finish it if a stop condition holds;
        a failure in any of that finishes ``seq`` alone with ``FinishReason.ERROR``."""
        try:
            return self._advance(seq, logits)
        except SequenceError as error:
            return self._fail(seq, error)

    def _advance(self, seq: Running, logits: np.ndarray) -> TokenEvent:
        with _stage("choosing the next token"):
            token = int(seq.sampler(logits, seq.seen))
            if not 0 <= token < len(logits):
                raise ValueError(f"the sampler chose token id {token}, outside the vocabulary of {len(logits)}")
        seq.generated.append(token)
        seq.seen = np.append(seq.seen, token)
        if token in self.eos_token_ids:
            return self._finish(seq, token, "", FinishReason.STOP)
        with _stage("detokenising"):
            piece = seq.detok.push(token)
        with _stage("matching stop strings"):
            text, hit = seq.stop_filter.feed(piece)
        if hit:
            return self._finish(seq, token, text, FinishReason.STOP_STRING, flush=False)
        if len(seq.generated) >= seq.request.params.max_new_tokens:
            return self._finish(seq, token, text, FinishReason.LENGTH)
        if seq.position >= self.max_len:  # (the next token has no position to be fed at)
            return self._finish(seq, token, text, FinishReason.CONTEXT_LENGTH)
        return TokenEvent(seq.request.request_id, token, text)

    def _finish(self, seq: Running, token: int | None, text: str, reason: FinishReason,
                flush: bool = True) -> TokenEvent:
        if flush:
            try:
                with _stage("detokenising the last text"):
                    tail, hit = seq.stop_filter.feed(seq.detok.flush())
                    text += tail if hit else tail + seq.stop_filter.flush()
            except SequenceError as error:
                if reason != FinishReason.CANCELLED:  # nobody reads a cancelled request's text
                    return self._fail(seq, error)
        self._release(seq)
        return TokenEvent(seq.request.request_id, token, text, reason, seq.stats)

    def _fail(self, seq: Running, error: SequenceError) -> TokenEvent:
        """End ``seq`` with ``FinishReason.ERROR``; the rest of the batch carries on."""
        log.error("request %s failed after %d generated tokens: %s", seq.request.request_id,
                  len(seq.generated), error, exc_info=error.cause)
        self._release(seq)
        return TokenEvent(seq.request.request_id, None, "", FinishReason.ERROR, seq.stats, error=error)

    def _release(self, seq: Running) -> None:
        """Free ``seq``'s slot (and its place in prefill) and stamp its final stats."""
        if seq.slot >= 0 and self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
        if self._prefilling is seq:
            self._prefilling, seq.embeds = None, None
        seq.stats.finished = time.perf_counter()
        seq.stats.generated_tokens = len(seq.generated)


def _decode_rows(running: list[Running]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decode inputs of running sequences: last tokens, positions and cache slots (n,)."""
    return (np.array([seq.generated[-1] for seq in running], dtype=np.int32),
            np.array([seq.position for seq in running], dtype=np.int32),
            np.array([seq.slot for seq in running], dtype=np.int32))


def generate(engine: Engine, request: Request) -> Iterator[TokenEvent]:
    """Run one request to completion on an otherwise idle engine, yielding each token;
    raises the :class:`SequenceError` of a request that fails."""
    engine.add(request)
    while True:
        for event in engine.step():
            if event.request_id == request.request_id:
                if event.error is not None:
                    raise event.error
                yield event
                if event.finish_reason is not None:
                    return
