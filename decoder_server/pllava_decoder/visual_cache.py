"""Visual tokens by content: the same video (same frames, same model) skips the encoder.

Pure bookkeeping, no model and no gRPC: an LRU over ``(sha256 of the content, num_frames,
model id)`` bounded in bytes. The content is a video file's bytes, or the list of images of
frames sent as images (hashed image by image with their lengths, and marked so that it can
never equal a video's digest). A hit moves the entry to the most recently used
end; storing evicts from the least recently used end until the total fits the budget. An
array larger than the whole budget is not stored; a budget of 0 disables the cache.

Used from the asyncio event loop only, so no lock is needed.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np


class VisualKey(NamedTuple):
    content_sha256: str  # a video's sha256, or "frames:" + the frames' digest
    num_frames: int
    model_id: str


def visual_key(content: bytes | Sequence[bytes], num_frames: int, model_id: str) -> VisualKey:
    """Key of a video file (``bytes``) or of frames sent as images (a sequence of ``bytes``)."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        return VisualKey(hashlib.sha256(content).hexdigest(), int(num_frames), model_id)
    return VisualKey("frames:" + frames_sha256(content), int(num_frames), model_id)


def frames_sha256(images: Sequence[bytes]) -> str:
    """One digest of an ordered list of images. Each image's length goes in before its bytes,
    so the same bytes split into images differently give a different digest."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(len(image).to_bytes(8, "little"))
        digest.update(image)
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedVisual:
    """What an encoder returned for one video: the tokens and the frames actually used."""

    visual: np.ndarray  # (V, D) float32
    num_frames: int

    @property
    def nbytes(self) -> int:
        return int(self.visual.nbytes)


class VisualCache:
    """LRU of :class:`CachedVisual` bounded by the sum of their ``nbytes``."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"visual cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[VisualKey, CachedVisual] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: VisualKey) -> bool:
        return key in self._entries

    def get(self, key: VisualKey) -> CachedVisual | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: VisualKey, entry: CachedVisual) -> bool:
        """Store ``entry`` (evicting least recently used ones); False if it cannot fit at all."""
        if entry.nbytes > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        while self._entries and self.nbytes + entry.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        return True
