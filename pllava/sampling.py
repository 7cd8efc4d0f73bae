"""Choosing the next token from logits: greedy by default, or sampling with temperature,
top-k, top-p and HF-style repetition penalty. Host-side numpy, one RNG per request (no
global random state), so a seeded request is reproducible whatever else runs beside it.

Every finite parameter that passes validation samples without overflow: logits are shifted by
their maximum before the temperature divides them, so a tiny temperature tends to greedy
instead of turning the probabilities into NaN, and tokens whose logit a huge repetition
penalty pushed to +inf are the only ones drawn. What is left to fail is the model itself:
NaN logits raise :class:`BadLogits` for that one request."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


#: Stop strings one request may carry, and characters in each: every generated token is
#: matched against them on the engine's one thread, which every stream shares.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. ``temperature == 0`` means greedy (argmax over the whole
    vocabulary, as the official PLLaVA inference does)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.greedy and (self.top_p < 1 or self.top_k):
            raise ValueError(f"top_p ({self.top_p:g}) and top_k ({self.top_k}) choose what to sample from, but "
                             "temperature 0 (the default) decodes greedily: give a temperature > 0 with them "
                             "(1 = the model's own distribution)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer from 0 to 2**64 - 1 (or unset), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class BadLogits(RuntimeError):
    """The model gave logits no token can be chosen from (NaN, or all -inf): the model's
    fault, not the request's."""


class Sampler:
    """Per-request token chooser holding that request's RNG."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen_ids: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        check_logits(logits)
        if p.repetition_penalty != 1.0 and len(seen_ids):
            logits = apply_repetition_penalty(logits, seen_ids, p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        logits = apply_temperature(logits, p.temperature)
        if p.top_k:
            logits = top_k_filter(logits, p.top_k)
        if p.top_p < 1.0:
            logits = top_p_filter(logits, p.top_p)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))


def check_logits(logits: np.ndarray) -> None:
    """Raise :class:`BadLogits` unless some token has a finite or +inf logit and none is NaN."""
    if np.isnan(logits).any():
        raise BadLogits(f"the model produced NaN logits ({int(np.isnan(logits).sum())} of {logits.size})")
    if not (logits > -np.inf).any():
        raise BadLogits("the model gave every token a logit of -inf")


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / temperature`` shifted so that the largest is 0, in float64: the same
    distribution, and no overflow (nor a temperature rounded to 0) however small the
    temperature. Logits of +inf (a huge repetition penalty divided a positive logit) stand
    for certainty: only those tokens keep a chance."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max()
    if np.isposinf(top):
        return np.where(np.isposinf(logits), 0.0, -np.inf)
    with np.errstate(over="ignore"):  # overflow gives -inf: a token with no chance, as meant
        return (logits - top) / temperature


def apply_repetition_penalty(logits: np.ndarray, seen_ids: np.ndarray, penalty: float) -> np.ndarray:
    """HF semantics: a seen token's logit is divided by the penalty if positive, else multiplied."""
    logits = logits.copy()
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < len(logits))]
    vals = logits[ids]
    with np.errstate(over="ignore"):  # +-inf for extreme penalties: see apply_temperature
        logits[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k >= len(logits):
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


#: Tokens :func:`top_p_filter` first sorts (more while they hold too little probability).
TOP_P_CANDIDATES = 256


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``
    (always at least one); of tokens tied at the edge, the lowest ids come first.

    Only the most likely tokens are sorted: every token whose logit reaches the
    ``TOP_P_CANDIDATES``-th largest (ties included), 16 times as many if they hold less than
    ``top_p``, the whole vocabulary if those do too (a very flat distribution).
    That is the head of the whole vocabulary's stable sort, and the tokens after it are never
    kept, so the result is the full sort's at a fraction of its cost (a stable sort of 32k
    logits took ~4 ms per token of every sampling stream, on the thread all streams share)."""
    probs = np.exp(logits - logits.max())
    total = probs.sum()
    candidates = np.arange(len(logits))  # the whole vocabulary if the heads below hold too little
    for size in (TOP_P_CANDIDATES, 16 * TOP_P_CANDIDATES):
        if size >= len(logits):
            break
        edge = np.partition(logits, -size)[-size]
        head = np.flatnonzero(logits >= edge)  # ascending ids: a stable sort keeps them so among ties
        if probs[head].sum() / total > top_p + 1e-9:
            candidates = head
            break
    order = candidates[np.argsort(-logits[candidates], kind="stable")]
    sorted_probs = probs[order] / total
    keep = np.cumsum(sorted_probs) - sorted_probs < top_p
    out = np.full_like(logits, -np.inf)
    out[order[keep]] = logits[order[keep]]
    return out
