"""Frames a caller sampled itself, sent as encoded images instead of a video file.

A curation pipeline or a camera that already decoded its video sends the frames it sampled,
each as a JPEG, PNG or WebP file. :func:`load_frame_images` decodes them into the same
``(T, H, W, 3)`` uint8 RGB array that :func:`pllava.video.load_frames` gives for a video, so
:func:`pllava.video.preprocess` and the model treat both alike: the same frames sent as
images and sampled from a video give the same visual tokens.

The frame count rule (:func:`frames_num_frames`) follows how a still image is handled:
every image is used once, in order, and the model repeats frames when its frame count for
the request is larger than the number sent.

CPU, numpy and PIL only: it runs in the encoder's video-worker processes.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from .video import Frames, VideoError, read_image

#: PIL format names of the images accepted, and the first bytes that announce them.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
_MAGIC = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",)}


def image_format(data: bytes) -> str | None:
    """The accepted format ``data`` starts as (JPEG, PNG or WEBP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for fmt, magics in _MAGIC.items() if data.startswith(magics)), None)


def decode_frame_image(data: bytes, name: str, max_frame_pixels: int | None = None) -> np.ndarray:
    """One encoded frame -> (H, W, 3) uint8 RGB; VideoError naming ``name`` if unusable or
    (from its header, before decoding) larger than ``max_frame_pixels``."""
    if not data:
        raise VideoError(f"{name}: the image is empty (0 bytes)")
    fmt = image_format(data)
    if fmt is None:
        raise VideoError(f"{name}: not a JPEG, PNG or WebP image (it starts with {data[:12].hex(' ')}); "
                         "frames are sent as JPEG, PNG or WebP files")
    # Only the announced format's decoder may run: bytes that merely look like a PNG never
    # reach another of PIL's decoders.
    return read_image(io.BytesIO(data), name, formats=(fmt,), max_frame_pixels=max_frame_pixels)


def load_frame_images(images: Sequence[bytes], name: str = "frames", max_frame_pixels: int | None = None) -> Frames:
    """Decode a caller's frames, first to last, into one ``(T, H, W, 3)`` uint8 array.

    Every image must decode to the same width and height, as a video's frames do: the
    preprocessing resizes a whole video by one rule computed from its frame size. Raises
    VideoError naming ``name`` and the index of the frame at fault.
    """
    if not images:
        raise VideoError(f"{name}: no frames (the list of images is empty); send at least one image")
    frames: list[np.ndarray] = []
    for index, data in enumerate(images):
        frame = decode_frame_image(bytes(data), f"{name}: frame {index}", max_frame_pixels)
        if frames and frame.shape != frames[0].shape:
            (h0, w0), (h, w) = frames[0].shape[:2], frame.shape[:2]
            raise VideoError(f"{name}: frame {index} is {w}x{h} but frame 0 is {w0}x{h0}; all frames must have "
                             "the same size, as a video's frames do (resize them to one size before sending)")
        frames.append(frame)
    count = len(frames)
    return Frames(frames=np.stack(frames), indices=tuple(range(count)), total_frames=count, fps=0.0,
                  is_image=False)


def frames_num_frames(requested: int, count: int, default: int) -> int:
    """The model's frame count for ``count`` frames sent as images.

    ``requested`` 0 means the larger of ``default`` (the model's frame count) and ``count``;
    otherwise it must be at least ``count``, since the frames are the caller's sampling and
    none is dropped. When the result exceeds ``count`` the model repeats the frames before
    pooling, as it repeats a still image: one frame gives a still image's visual tokens, and
    ``count >= default`` frames give the tokens of a video sampled with ``num_frames=count``.
    Raises ValueError for ``requested`` below ``count``.
    """
    if requested == 0:
        return max(int(default), int(count))
    if requested < count:
        raise ValueError(f"num_frames is {requested} but {count} frames were sent; frames sent as images are all "
                         f"used, none is dropped: leave num_frames at 0 or set it to at least {count}")
    return int(requested)
