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
from typing import Iterator, Sequence

import numpy as np

from .config import PreprocessorConfig
from .video import Frames, VideoError, check_aspect_ratio, preprocess, read_image

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
    frames = list(_decode_each(images, name, max_frame_pixels))
    count = len(frames)
    return Frames(frames=np.stack(frames), indices=tuple(range(count)), total_frames=count, fps=0.0,
                  is_image=False)


def load_frame_pixels(images: Sequence[bytes], name: str = "frames", cfg: PreprocessorConfig | None = None,
                      max_frame_pixels: int | None = None) -> np.ndarray:
    """``preprocess(load_frame_images(images, name, max_frame_pixels).frames, cfg)``, bit for
    bit, one image at a time: each is decoded and preprocessed before the next is decoded, so
    memory follows the preprocessed size, not frames x source size. Frames whose aspect ratio
    is over :data:`pllava.video.MAX_ASPECT_RATIO` are refused after the first is decoded."""
    cfg = cfg or PreprocessorConfig()
    out: np.ndarray | None = None
    for index, frame in enumerate(_decode_each(images, name, max_frame_pixels)):
        if out is None:
            check_aspect_ratio(name, "frames are", frame.shape[1], frame.shape[0], cfg.shortest_edge)
        pixels = preprocess(frame[None], cfg, name)
        if out is None:
            out = np.empty((len(images),) + pixels.shape[1:], pixels.dtype)
        out[index] = pixels[0]
    return out


def _decode_each(images: Sequence[bytes], name: str, max_frame_pixels: int | None) -> Iterator[np.ndarray]:
    """Decode ``images`` one by one, checking each has frame 0's size."""
    if not images:
        raise VideoError(f"{name}: no frames (the list of images is empty); send at least one image")
    first: tuple[int, ...] | None = None
    for index, data in enumerate(images):
        frame = decode_frame_image(bytes(data), f"{name}: frame {index}", max_frame_pixels)
        if first is not None and frame.shape != first:
            (h0, w0), (h, w) = first[:2], frame.shape[:2]
            raise VideoError(f"{name}: frame {index} is {w}x{h} but frame 0 is {w0}x{h0}; all frames must have "
                             "the same size, as a video's frames do (resize them to one size before sending)")
        first = frame.shape
        yield frame


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
