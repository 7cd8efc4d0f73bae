"""What each KV-cache slot still holds that a later prompt can start from.

A slot keeps the keys and values a prompt wrote until something writes over them. Those of
the prompt's leading text (the ids before ``<image>``) depend on nothing else, attention being
causal, so a later prompt that starts with the same ids can begin its prefill after them, in
that slot or in one the rows are copied to. Every request of a deployment usually starts
with the same system prompt: with the benchmark checkpoint's tokenizer the default template
puts 260 of a 4-frame prompt's 865 positions (30%) before the video.

:class:`SlotPrefixes` is the record the language model keeps of its own cache: every write
into a slot forgets that slot's rows from the written position on (so a caller writing
through any path cannot leave a stale record), and only the engine (after a chunk of a
prompt has written them) and ``PllavaLanguage.copy_prefix`` (after copying them) say which
ids a slot's rows hold.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def leading_text(prompt_ids: Sequence[int], image_token_id: int | None) -> np.ndarray:
    """The ids whose cache rows a prompt can share with another: those before its first
    ``image_token_id`` (all of them without one), int32."""
    ids = np.asarray(prompt_ids, dtype=np.int32)
    if image_token_id is None:
        return ids
    at = np.flatnonzero(ids == image_token_id)
    return ids[:at[0]] if len(at) else ids


def common_length(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class SlotPrefixes:
    """Per slot: the ids whose keys and values sit in the slot's first ``rows`` positions."""

    def __init__(self, num_slots: int):
        self._ids = [np.zeros(0, np.int32) for _ in range(num_slots)]
        self._rows = [0] * num_slots

    def written(self, slot: int, position: int) -> None:
        """Something writes ``slot`` at ``position`` or later: its rows from there on are
        no longer the recorded ids'. A negative position writes no row of the slot."""
        if position >= 0:
            self._rows[slot] = min(self._rows[slot], position)

    def forget(self) -> None:
        """Every slot's rows were overwritten (warm-up writes garbage)."""
        self._rows = [0] * len(self._rows)

    def keep(self, slot: int, ids: np.ndarray, rows: int) -> None:
        """``slot``'s first ``rows`` positions now hold the keys and values of ``ids``."""
        self._ids[slot] = np.asarray(ids, dtype=np.int32)
        self._rows[slot] = max(0, min(rows, len(ids)))

    def rows(self, slot: int) -> int:
        return self._rows[slot]

    def ids(self, slot: int) -> np.ndarray:
        return self._ids[slot][:self._rows[slot]]

    def reusable(self, slot: int, ids: np.ndarray) -> int:
        """How many leading positions of a prompt starting with ``ids`` ``slot`` holds."""
        return common_length(self.ids(slot), ids)

    def sources(self, slots: Sequence[int], limit: int, least: int = 16) -> list[tuple[int, int]]:
        """For each of ``slots`` (the sequences of one decode step): (the slot to read its first
        rows from, how many), where an earlier slot of the step holds at least ``least`` of the
        same leading ids (the one holding the most; at most ``limit`` rows), else (itself, 0).
        Sequences sharing a system prompt then read its keys and values from one slot, which
        a step reads from memory once for all of them."""
        out, firsts = [], []
        for slot in slots:
            found, most = self.best(self.ids(slot), firsts)
            if found >= 0 and most >= least:
                out.append((found, min(most, limit)))
            else:
                out.append((slot, 0))
                firsts.append(slot)
        return out

    def best(self, ids: np.ndarray, slots: Iterable[int]) -> tuple[int, int]:
        """(the slot among ``slots`` holding the most of ``ids``, how many); the first of
        equals; (-1, 0) for no slot."""
        found, most = -1, -1
        for slot in slots:
            n = self.reusable(slot, ids)
            if n > most:
                found, most = slot, n
        return found, max(most, 0)
