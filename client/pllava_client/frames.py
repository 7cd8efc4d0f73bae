"""Frames a caller sampled itself: a folder or list of images sent instead of a video file.

The decoder forwards them to an encoder, which decodes each image and preprocesses the frames
exactly as it does the frames it samples from a video (``Frames`` in the proto has the
rules: count, sizes, formats). Here only the client's part: finding a folder's images and
reading each frame's bytes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Iterable, Union

#: File endings ``frame_files`` picks up (case-insensitive): the formats the encoder decodes.
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

Frame = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]


def frame_files(folder: Union[str, "os.PathLike[str]"]) -> list[Path]:
    """The JPEG, PNG and WebP files directly in ``folder``, sorted by name: the frame order.

    Names sort as strings, so number frames with zero padding (``frame_0009.png`` before
    ``frame_0010.png``). Other files and subfolders are ignored. Raises ValueError when the
    folder does not exist or holds no such image.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder of frames")
    found = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and p.is_file()),
                   key=lambda p: p.name)
    if not found:
        raise ValueError(f"{path}: no frames in this folder (no {', '.join(FRAME_EXTENSIONS)} files)")
    return found


def read_frames(frames: Iterable[Frame]) -> tuple[list[bytes], str]:
    """``(images, name)``: each frame's bytes (a frame is a path, bytes or a binary file
    object) and a name for the server's messages, the folder of the first path ("" when the
    frames are not files). Raises TypeError for a single path or bytes where a list belongs
    and ValueError for an empty list."""
    if isinstance(frames, (str, bytes, bytearray, memoryview, os.PathLike)) or not isinstance(frames, Iterable):
        raise TypeError("frames is a list of images (paths, bytes or binary files), first frame first, not "
                        f"{type(frames).__name__}; for a folder use pllava_client.frame_files(FOLDER)")
    frames = list(frames)
    if not frames:
        raise ValueError("frames is empty: give at least one image")
    images = [_read_frame(frame, index) for index, frame in enumerate(frames)]
    first = frames[0]
    name = os.path.basename(os.path.dirname(os.path.abspath(first))) if isinstance(first, (str, os.PathLike)) else ""
    return images, name


def _read_frame(frame: Frame, index: int) -> bytes:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return bytes(frame)
    if isinstance(frame, (str, os.PathLike)):
        with open(frame, "rb") as f:
            return f.read()
    read = getattr(frame, "read", None)
    if callable(read):
        data = read()
        if isinstance(data, str):
            raise TypeError(f"frame {index}: the file object is open in text mode; open it with 'rb'")
        return bytes(data)
    raise TypeError(f"frame {index}: a frame is a path, bytes or a binary file object, not {type(frame).__name__}")
