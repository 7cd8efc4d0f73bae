"""How long a prefill chunk may be while other streams are decoding.

Between two tokens of a running stream the engine runs one prefill chunk of the prompt it is
admitting and one decode step, so a stream's wait is the chunk's time plus the step's. A
fixed short chunk keeps that wait small but feeds a long prompt slowly (a 32-token chunk
feeds about 0.6x the tokens per second of a 256-token one on CPU, and every chunk costs a
decode step of every stream), so the engine takes the longest compiled chunk whose time
fits the wait allowed: ``max_gap_steps`` decode steps in all. Times are measured, not
estimated: each prefill graph is timed at warm-up, then every chunk and step the engine runs
updates a moving average, so the choice follows the machine's load. A warm-up time is that of a
chunk alone on an idle machine; beside decode steps the same chunk ran up to 1.5x slower
(64 positions at context 2048: 212 ms at warm-up, ~320 ms in an admission, one wait of 4.7
steps). So until a chunk has run while streams decode, its time counts ``untried_margin``
times. Where the model runs a chunk and the decode rows as one call (the CPU kernels), the
streams wait that call alone, timed as it runs; until it has run so, it counts as the chunk
and a step apart, ``untried_margin`` times over (the first 64-position one of an admission
beside 7 streams took 100-116 ms, 1.3x its parts apart: 3.6-4.1 steps), or, once a shorter
chunk has run so, as that call's chunk part scaled by the sizes.

Late in a 16-frame prompt such a call is mostly the chunk's attention over the prompt so far
(reading its cache rows: per step, whatever the chunk's size) and its rows through the
weights: beside 7 streams on a 2-core AMD EPYC, 16 positions ~55 ms, 32 ~72 ms, against a
~28 ms decode step. So the shortest chunk is 16 positions and the wait allowed is 2.5 steps
by default: single steps there scatter by +30-50%, and the longest wait of ~100 such calls is
what a stream feels (with 32 positions the shortest and 3.5 steps allowed: 3.0-4.8 steps over
thirteen runs on two days; with 16 and 3: 2.8-3.8 over ten). The longest waits are the
longest chunks let in: each counts as its likely longest time, yet the longest of ~40 such
calls still ran past it by 10-15% (on a 2-core Xeon, six admissions each, alternating: 3
steps allowed, 2.6-3.5x the step, median 3.2, the prompt in 8.6-11.4 s; 2.5 steps, 2.5-3.1x,
median 2.7, in 9.4-12.1 s).

Where even the shortest chunk's call, measured beside the decode rows at its context, is
judged longer than the wait allowed, the engine runs that chunk in parts: a call per part,
each the decode rows through every layer and the chunk's rows through a share of the layers
(``PllavaLanguage.chunk_layer_parts``). A stream then waits a decode step and a share of the
chunk per token (at position 2400 beside 7 streams on a 2-core Xeon: 58-60 ms a part, the
whole call 77-80, the decode step 40). A chunk run in parts counts as the whole call it
stands for (:meth:`AdmissionPacer.parts_ran`), so the whole chunk is judged again as times
change; until it has run at a context, it is judged by its calls at the context bucket below
(the positions just under the new bucket's first), and with none there, not at all.

A decode step counts at the load of the streams decoding now: each timed step is scaled by
what a step reads now (the weights and each stream's cache rows) against what it read. While
prompts enter, the streams decode inside the chunks' calls, so the latest steps run alone
were often of 1-2 streams where 6-7 now decode, and 3 of those let only the shortest chunk in.

A chunk's time varies from run to run (a 64-position chunk in one call with 7 decode rows,
at context 4096 on a 2-core AMD EPYC: 110-176 ms, mean ~120, beside a 31 ms step), and the
longest wait is what a stream feels, so a chunk counts as its mean time plus ``spread_margin``
times its mean deviation (both moving averages, as a TCP sender times its round trips): where
a size runs close to the limit and scatters, the next smaller one runs instead.

While prompts queue behind the one entering (each with a free slot to take), the wait allowed
grows by a factor 1 + ``queued_weight`` x queued prompts / streams decoding (up to
``max_stretch``, the engine's choice): the users queued for the prefill wait too, with nothing
on screen yet, and short chunks feed a prompt at about half the rate of long ones (every chunk
also costs a step's weight reads). A lone admission is paced as above. 8 prompts of 4 frames
(608 positions, 128 tokens each) into one engine, half a second apart, on a 2-core AMD EPYC,
four runs each: with the wait stretched by the ratio of prompts entering to streams decoding
(up to 4) they took 366-431 steps, mostly of 16-position chunks, the last first token at
13.6-15.5 s and the last token at 16.6-18.5 s; with a weight of 4 per queued prompt, 190-213
steps, 8.4-9.8 s and 13.1-14.2 s, the streams' longest wait between two tokens 191 ms against
99 (one run each). On the servers (2 encoders + decoder, 8 clients at once, the videos
reaching the decoder 1-7 s apart): 22.2 videos/min against 20.2 on average, twelve runs each,
alternating.
"""
from __future__ import annotations

import statistics
from collections import deque

#: the defaults the engine and the decoder's settings share: the wait allowed per token of a
#: running stream while a prompt enters (decode steps), how far it may stretch while prompts
#: queue, and the weight of each queued prompt in that stretch (see the module docstring)
DEFAULT_MAX_GAP_STEPS = 2.5
DEFAULT_MAX_GAP_STRETCH = 4.0
DEFAULT_QUEUED_WEIGHT = 4.0


class AdmissionPacer:
    """Decides, from measured times, which long chunks may run while streams decode.

    ``seconds`` maps ("prefill", size, context) to a chunk's time (the language model's
    warm-up timings; kept up to date here), and ("mixed", size, context, rows) to that of a
    chunk run in one call with ``rows`` decode rows (measured as they run: a chunk timed beside
    1-6 streams ran ~20% longer beside 7); ``deviation`` maps the same keys to the mean
    deviation of those times. A chunk not timed yet is not allowed until it has run once while
    nothing else decoded."""

    def __init__(self, seconds: dict | None = None, max_gap_steps: float = DEFAULT_MAX_GAP_STEPS, smoothing: float = 0.3,
                 untried_margin: float = 1.5, spread_margin: float = 2.0, step_window: int = 9):
        if not max_gap_steps >= 1:  # (NaN too)
            raise ValueError(f"max_gap_steps must be at least 1 (one decode step), got {max_gap_steps}")
        if not spread_margin >= 0:
            raise ValueError(f"spread_margin must be at least 0 (0 = mean times only), got {spread_margin}")
        self.seconds = {} if seconds is None else seconds
        self.max_gap_steps = max_gap_steps
        self.smoothing = smoothing  # weight of the newest sample in each moving average
        self.untried_margin = untried_margin
        self.spread_margin = spread_margin
        self.deviation: dict[tuple, float] = {}
        self._ran: set[tuple] = set()  # chunks timed here (not only at warm-up)
        self.tried: set[tuple[str, int, int]] = set()  # chunks timed while streams decoded
        self._steps: deque[tuple[float, float]] = deque(maxlen=step_window)  # (seconds, load)

    def allows(self, size: int, context: int, with_decode: int = 0, stretch: float = 1.0,
               load: float | None = None) -> bool:
        """May a chunk of ``size`` at ``context`` run before the next decode step, or with
        ``with_decode`` (> 0) decode rows in one model call? The streams then wait that
        call alone: once it has run so, its measured time; until then as
        :meth:`_untried_mixed` estimates it. ``stretch`` (>= 1) scales the wait
        allowed (see :func:`queue_stretch`); ``load``: what a decode step of the streams now
        decoding reads (:meth:`step_ran`), None for those of the latest step."""
        step = self.step_at(load)
        if step is None:
            return False
        allowed = self.max_gap_steps * step * max(1.0, stretch)
        if with_decode and ("mixed", size, context, with_decode) in self.seconds:
            return self._likely_longest(("mixed", size, context, with_decode)) <= allowed
        key = ("prefill", size, context)
        if key not in self.seconds:
            return False
        chunk = self._likely_longest(key)
        if with_decode:  # not run with the decode rows at this context yet
            return self._untried_mixed(size, context, with_decode, chunk, step) <= allowed
        if key not in self.tried:
            chunk *= self.untried_margin
        return chunk + step <= allowed

    def judged_too_long(self, size: int, context: int, with_decode: int, stretch: float = 1.0,
                        load: float | None = None) -> bool:
        """Whether a chunk beside ``with_decode`` decode rows is judged to keep the streams
        waiting longer than allowed (:meth:`allows`) on measured steps of its kind: its own
        at ``context``, or before it has run at this context, those at the context bucket
        below (see :meth:`_untried_mixed`). Until it has run so at either, there is nothing
        to judge by (False)."""
        return (self._measured_mixed(size, context, with_decode) is not None and self.step_at(load) is not None
                and not self.allows(size, context, with_decode, stretch, load))

    def _measured_mixed(self, size: int, context: int, rows: int) -> tuple | None:
        """The measured one-call time to judge a chunk beside ``rows`` decode rows by: its own
        at ``context``, else its own at the nearest context below (None: neither)."""
        if ("mixed", size, context, rows) in self.seconds:
            return ("mixed", size, context, rows)
        below = [c for s, c in self._mixed_ran(rows) if s == size and c < context]
        return ("mixed", size, max(below), rows) if below else None

    def _mixed_ran(self, rows: int) -> list[tuple[int, int]]:
        """(size, context) of every chunk timed in one call with ``rows`` decode rows."""
        return [(s, c) for kind, s, c, *r in self.seconds if kind == "mixed" and r == [rows]]

    def parts_ran(self, size: int, context: int, seconds: list[float], with_decode: int,
                  load: float | None = None) -> None:
        """A chunk ran in ``len(seconds)`` steps beside ``with_decode`` decode rows, each
        through a share of the layers: it counts as the one step it stands for
        (:meth:`chunk_ran`), the parts' sum less the decode steps they repeat (each part
        holds a decode step of the streams and its share of the chunk), so that the whole
        chunk is judged again as times change."""
        step = self.step_at(load)
        if step is None or not seconds:
            return
        whole = max(max(seconds), sum(seconds) - (len(seconds) - 1) * step)
        self.chunk_ran(size, context, whole, busy=True, with_decode=with_decode)

    @property
    def step_s(self) -> float | None:
        """A decode step at the latest step's load (None before any)."""
        return self.step_at()

    def step_at(self, load: float | None = None) -> float | None:
        """A decode step of streams whose step reads ``load`` (None: those of the latest
        step): the recent steps' median time per unit of load, times ``load``."""
        if not self._steps:
            return None
        if load is None:
            load = self._steps[-1][1]
        return statistics.median(seconds / ran for seconds, ran in self._steps) * load

    def _untried_mixed(self, size: int, context: int, rows: int, chunk: float, step: float) -> float:
        """A chunk not yet run in one call with ``rows`` decode rows: where a shorter chunk has
        run so, a step and that call's chunk part scaled by the sizes (a chunk's rows and its
        attention cost in proportion: a 16-position one beside 7 streams at context 4096 took
        66 ms beside a 38 ms step, a 32 87 ms); with none, the same chunk's call at the nearest
        context bucket below (its latest times are of the positions just under this bucket's
        first, so the first chunk of a new bucket is judged, not run whole on trust); with
        none, the chunk alone (``chunk``) and a step, ``untried_margin`` times (one such call
        took ~1.3x its parts apart). Warm-up times of two sizes differ too little to scale by
        (one run each on an idle machine, at positions whose cache rows are still zero pages)."""
        shorter = [s for s, c in self._mixed_ran(rows) if s < size and c == context]
        if not shorter:
            below = self._measured_mixed(size, context, rows)
            return (chunk + step) * self.untried_margin if below is None else self._likely_longest(below)
        base = max(shorter)
        part = max(0.0, self._likely_longest(("mixed", base, context, rows)) - step)
        return step + part * size / base

    def _likely_longest(self, key: tuple) -> float:
        return self.seconds[key] + self.spread_margin * self.deviation.get(key, 0.0)

    def chunk_ran(self, size: int, context: int, seconds: float, busy: bool = False,
                  with_decode: int = 0) -> None:
        """A chunk took ``seconds``; ``busy``: while streams decoded; ``with_decode``: in one
        call with that many decode rows (timed apart from the chunk alone)."""
        key = ("mixed", size, context, with_decode) if with_decode else ("prefill", size, context)
        old = self.seconds.get(key)
        if key in self._ran:  # a warm-up time is of an idle machine: no measure of the scatter
            self.deviation[key] = self._average(self.deviation.get(key), abs(seconds - old))
        self._ran.add(key)
        self.seconds[key] = self._average(old, seconds)
        if busy and not with_decode:
            self.tried.add(key)

    def step_ran(self, seconds: float, load: float = 1.0) -> None:
        """A decode step took ``seconds``; ``load``: what it read (any unit, the same for
        every call: the engine counts bytes, ``pllava.shapes.DecodeCost.reads``). The wait
        allowed counts in the median of the latest ``step_window`` steps, which one slow step
        does not move (in a moving average of weight 0.3, one 60 ms step among 28 ms ones
        raised the wait allowed by ~30 ms at 3 steps), each scaled to the load of the streams
        decoding now: while prompts enter, the steps run with their chunks (the mixed calls),
        so the latest steps run alone may be of fewer streams (1-2 at 15-18 ms beside 25-28
        for 6-7 on the benchmark model at 4 frames), and a wait of 3 of those let in only the
        shortest chunk."""
        if not load > 0:
            raise ValueError(f"a step's load must be positive, got {load}")
        self._steps.append((seconds, load))

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)


def queue_stretch(entering: int, decoding: int, max_stretch: float,
                  queued_weight: float = DEFAULT_QUEUED_WEIGHT) -> float:
    """How much longer than ``max_gap_steps`` the decoding streams may wait per token while
    ``entering`` prompts (the one being fed and those with a free slot to take next) wait for
    the prefill: 1 + ``queued_weight`` x (prompts queued behind the one being fed) / streams,
    at most ``max_stretch``; 1 for a lone admission. Prompts that wait for a slot do not
    count: they wait for the running streams to finish, which a longer wait would delay."""
    if decoding < 1:
        return 1.0
    return min(1.0 + queued_weight * max(0, entering - 1) / decoding, max(1.0, max_stretch))
