"""What a video-worker process runs: bytes -> sampled, preprocessed frames.

Frames sent as images are decoded here too, never in the server process, so that a hostile
image can at worst take down a worker.

Kept apart from :mod:`pllava_encoder.engine` so that a worker process imports only
``pllava.video`` (numpy, PIL, decord, PyAV) and the standard-library
:mod:`pllava_serving.parent_death`, never MindSpore. :func:`serve` is the process's
whole life: jobs arrive on its end of a pipe, answers go back the same way, and it ends when
the pipe closes (its server went away) or says stop.
"""
from __future__ import annotations

import io
import sys
import time
import traceback

import numpy as np

from pllava.config import PreprocessorConfig
from pllava.frame_images import load_frame_pixels
from pllava.video import VideoError, load_pixels
from pllava_serving.parent_death import die_with_parent

#: The first message a worker sends: it has imported everything and takes jobs.
READY = "ready"


def decode_video(data: bytes, name: str, num_frames: int, preprocessor: PreprocessorConfig,
                 max_frame_pixels: int | None = None) -> tuple[np.ndarray, float]:
    """-> (float32 pixels (T, 3, S, S), seconds spent). T is ``num_frames`` for a video and 1
    for a still image. Raises ``pllava.video.VideoError`` naming ``name`` for bad input.
    The sampled frames are decoded a few at a time, each group preprocessed before the next
    (:func:`pllava.video.load_pixels`): a worker's memory follows the preprocessed size."""
    start = time.perf_counter()
    source = io.BytesIO(data)
    source.name = name  # load_pixels names a file object by its .name in error messages
    pixels = load_pixels(source, num_frames, preprocessor, max_frame_pixels)
    return pixels, time.perf_counter() - start


def decode_frames(images: list[bytes], name: str, preprocessor: PreprocessorConfig,
                  max_frame_pixels: int | None = None) -> tuple[np.ndarray, float]:
    """-> (float32 pixels (len(images), 3, S, S), seconds spent): the caller's frames through
    the same preprocessing as a video's. Raises ``pllava.video.VideoError`` naming ``name``
    and the frame index for bad input. Each image is preprocessed before the next is decoded."""
    start = time.perf_counter()
    pixels = load_frame_pixels(images, name, preprocessor, max_frame_pixels)
    return pixels, time.perf_counter() - start


def serve(conn, server_pid: int) -> None:
    """Answer ``(ok, value)`` to each job, ``(function, *arguments)`` with a function of this
    module; ``None`` stops.

    ``value`` is the result, a ``VideoError`` (the input's fault), or a ``RuntimeError``
    describing any other failure (its traceback goes to stderr, the server's log). The
    process ends with its server ``server_pid`` even in the middle of a job (a closed pipe
    is only noticed between jobs): a server killed with SIGKILL leaves no worker behind, nor
    multiprocessing's resource tracker, which lives as long as a worker holds its pipe.
    """
    die_with_parent(server_pid)
    import av  # noqa: F401  imported now, so a job's time budget is spent on the video only
    import decord  # noqa: F401

    conn.send(READY)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if job is None:
            return
        function, *arguments = job
        try:
            reply = (True, function(*arguments))
        except VideoError as exc:
            reply = (False, exc)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            reply = (False, RuntimeError(f"the video worker failed: {type(exc).__name__}: {exc}"))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
