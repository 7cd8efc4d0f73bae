"""What a video-worker process runs: bytes -> sampled, preprocessed frames.

Frames sent as images are decoded here too, never in the server process, so that a hostile
image can at worst take down a worker.

Kept apart from :mod:`pllava_encoder.engine` so that a worker process imports only
``pllava.video`` (numpy, PIL, decord), never MindSpore.
"""
from __future__ import annotations

import io
import time

import numpy as np

from pllava.config import PreprocessorConfig
from pllava.frame_images import load_frame_images
from pllava.video import load_frames, preprocess


def decode_video(data: bytes, name: str, num_frames: int,
                 preprocessor: PreprocessorConfig) -> tuple[np.ndarray, float]:
    """-> (float32 pixels (T, 3, S, S), seconds spent). T is ``num_frames`` for a video and 1
    for a still image. Raises ``pllava.video.VideoError`` naming ``name`` for bad input."""
    start = time.perf_counter()
    source = io.BytesIO(data)
    source.name = name  # load_frames names a file object by its .name in error messages
    frames = load_frames(source, num_frames)
    pixels = preprocess(frames.frames, preprocessor)
    return pixels, time.perf_counter() - start


def decode_frames(images: list[bytes], name: str, preprocessor: PreprocessorConfig) -> tuple[np.ndarray, float]:
    """-> (float32 pixels (len(images), 3, S, S), seconds spent): the caller's frames through
    the same preprocessing as a video's. Raises ``pllava.video.VideoError`` naming ``name``
    and the frame index for bad input."""
    start = time.perf_counter()
    pixels = preprocess(load_frame_images(images, name).frames, preprocessor)
    return pixels, time.perf_counter() - start


def ready() -> bool:
    """A no-op job: makes the pool start a worker and import this module."""
    return True
