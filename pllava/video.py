"""Video and image input for PLLaVA: decode, sample frames, preprocess to ``pixel_values``.

Two stages, kept apart so each can be tested against its reference:

1. :func:`load_frames` turns a path, ``bytes`` or a binary file object into RGB uint8 frames.
   Videos are decoded with decord and sampled with PLLaVA's :func:`get_index`; still images
   are read with PIL and come back as ONE frame (the model repeats it to ``num_frames``).
2. :func:`preprocess` turns those frames into float32 ``(T, 3, crop_h, crop_w)`` exactly as
   PLLaVA's ``PllavaProcessor`` does: its long/short resize, then the CLIP image processor
   (resize shortest edge, center crop, rescale, normalize, CHW). Both resizes go through PIL,
   because bicubic resampling differs between libraries and the reference uses PIL.

Bad input raises :class:`VideoError` naming the input and the reason. Inputs are checked
cheaply before decord sees them, because decord echoes the raw bytes of unreadable in-memory
data to stderr and gives messages that do not say what is wrong. A video's streams are read
from its container header with PyAV first (no frame is decoded for that): a file without a
video stream is named as such, and ``max_frame_pixels`` refuses frames too large to decode
safely (a decompression bomb: a small file declaring huge frames) before any are decoded.
Frames more than :data:`MAX_ASPECT_RATIO` times wider than high (or higher than wide) are
refused too: PLLaVA's resize keeps their short side at 336 pixels, so a 2048x1 strip would
become 688128x336 (see :func:`check_aspect_ratio`).

:func:`load_pixels` does both stages for one input with bounded memory: a video's sampled
frames are decoded a few at a time (:data:`DECODE_GROUP_BYTES`), each group preprocessed
before the next is decoded, so memory follows the preprocessed size, not frames x source
size. Its pixels are those of ``preprocess(load_frames(...).frames)``, bit for bit.

This module is CPU and numpy only: no MindSpore, no torch.
"""
from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from .config import PreprocessorConfig

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

# Hard-coded in PLLaVA's processor: the long side a video is first brought down to (at most),
# and the resample filter of that first resize (it ignores the CLIP config's ``resample``).
PLLAVA_MAX_LONG_EDGE = 640
PLLAVA_RESAMPLE = Image.BICUBIC


class VideoError(ValueError):
    """The input cannot be used as a video or image; the message names it and says why."""


#: Frames whose long side is more than this many times their short side are refused
#: (:func:`check_aspect_ratio`). PLLaVA's resize keeps the short side at ``shortest_edge``
#: (336), so the long side becomes about 336 x the aspect ratio: at most 3,360 pixels here,
#: where a 2048x1 strip (which passes any pixel limit) would need 688,128.
MAX_ASPECT_RATIO = 10

#: Largest group of full-size frames a video is decoded in at once (bytes of RGB, at least one
#: frame, at most :data:`MAX_DECODE_GROUP` frames); each group is preprocessed (shrunk) before
#: the next is decoded.
DECODE_GROUP_BYTES = 64 << 20
MAX_DECODE_GROUP = 16

#: decord returns garbled rows (its channel count is the padded row size over the width) for
#: some frames this narrow; the widest seen failing was 72 pixels.
NARROW_VIDEO_WIDTH = 128


# --------------------------------------------------------------------------- sampling

def get_index(num_video_frames: int, num_segments: int) -> list[int]:
    """PLLaVA's frame sampling: ``num_segments`` indices, about the midpoints of equal segments.

    seg = (N-1)/T, start = int(seg/2), idx_i = start + int(np.round(seg*i)). ``np.round`` rounds
    halves to even (0.5 -> 0, 1.5 -> 2), which is why it is used rather than ``int(x + 0.5)``:
    the indices must be the reference's. With N < T indices repeat.
    """
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    seg = (num_video_frames - 1) / num_segments
    start = int(seg / 2)
    return [start + int(np.round(seg * i)) for i in range(num_segments)]


# --------------------------------------------------------------------------- loading

@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class Frames:
    """Decoded frames and where they came from."""

    frames: np.ndarray          # (T, H, W, 3) uint8 RGB; T == 1 for a still image
    indices: tuple[int, ...]    # frame indices used (may repeat for short videos); (0,) for images
    total_frames: int           # frames in the whole video; 1 for an image
    fps: float                  # average frame rate reported by the container; 0.0 for an image
    is_image: bool              # True when the input was a still image


def load_frames(source: Source, num_frames: int, max_frame_pixels: int | None = None) -> Frames:
    """Read ``source`` and return ``num_frames`` sampled RGB frames (one frame for an image).

    ``source`` is a path (str or ``os.PathLike``), ``bytes``-like data, or a binary file object
    (read to its end). Raises :class:`VideoError` for input that is missing, empty, truncated,
    not a video or image, without a video stream, not decodable, or whose frames (as its
    header declares them) have more than ``max_frame_pixels`` pixels, and for ``num_frames < 1``.
    """
    return _load(source, num_frames, max_frame_pixels, None)


def load_pixels(source: Source, num_frames: int, cfg: PreprocessorConfig | None = None,
                max_frame_pixels: int | None = None) -> np.ndarray:
    """``preprocess(load_frames(source, num_frames, max_frame_pixels).frames, cfg)``, bit for
    bit, without holding every sampled frame at full size: a video's frames are decoded in
    groups of at most :data:`DECODE_GROUP_BYTES` and each group is preprocessed before the
    next is decoded. Frames over :data:`MAX_ASPECT_RATIO` are refused from the video's
    header, before any is decoded. (num_frames, 3, crop_h, crop_w) float32 for a video,
    (1, 3, crop_h, crop_w) for a still image; raises :class:`VideoError` as
    :func:`load_frames` and :func:`preprocess` do."""
    return _load(source, num_frames, max_frame_pixels, cfg or PreprocessorConfig()).frames


def _load(source: Source, num_frames: int, max_frame_pixels: int | None, cfg: PreprocessorConfig | None) -> Frames:
    """:func:`load_frames`, or with ``cfg`` :func:`load_pixels` (then ``frames`` holds pixel values)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise VideoError(f"num_frames must be a positive integer, got {num_frames!r}")
    name, path, data = _open_source(source)
    try:
        with (open(path, "rb") if path is not None else io.BytesIO(data)) as f:
            size = os.fstat(f.fileno()).st_size if path is not None else len(data)
            if size == 0:
                raise VideoError(f"{name}: the input is empty (0 bytes)")
            head = f.read(_SNIFF_BYTES)
            kind = _sniff(head, name)
            if kind == "isobmff":
                _check_isobmff(f, size, name)
            elif head.startswith(_EBML_MAGIC):
                _check_matroska(f, size, name)
    except OSError as exc:  # permission denied, I/O error, ...
        raise VideoError(f"{name}: could not be read ({exc.strerror or exc})") from exc
    if kind == "image":
        return _load_image(path if path is not None else io.BytesIO(data), name, max_frame_pixels, cfg)
    return _load_video(path if path is not None else io.BytesIO(data), name, int(num_frames), max_frame_pixels, cfg)


def _check_frame_size(name: str, what: str, width: int, height: int, max_frame_pixels: int | None) -> None:
    if max_frame_pixels is not None and width * height > max_frame_pixels:
        raise VideoError(f"{name}: the {what} {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{max_frame_pixels:,} pixels per frame (max_frame_pixels); scale it down first")


def check_aspect_ratio(name: str, what: str, width: int, height: int, shortest_edge: int = 336) -> None:
    """Refuse (:class:`VideoError`) frames whose long side is over :data:`MAX_ASPECT_RATIO`
    times their short side, saying what they would be resized to. ``what`` is e.g. "image is"."""
    short, long = min(width, height), max(width, height)
    if long > MAX_ASPECT_RATIO * short:
        new_h, new_w = pllava_resize_size(height, width, shortest_edge)
        ratio = f"{long / short:.1f}".removesuffix(".0")
        prefix = f"{name}: " if name else ""
        raise VideoError(f"{prefix}the {what} {width}x{height} pixels, an aspect ratio of {ratio}:1, over the limit of "
                         f"{MAX_ASPECT_RATIO}:1 (the preprocessing keeps the short side at {shortest_edge} pixels: "
                         f"{new_w}x{new_h} after resizing); crop or pad to at most {MAX_ASPECT_RATIO}:1 first")


def _open_source(source: Source) -> tuple[str, Path | None, bytes | None]:
    """Split ``source`` into (display name, path or None, in-memory bytes or None)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise VideoError(f"{path}: no such file")
        if not path.is_file():
            raise VideoError(f"{path}: not a regular file (is it a directory?)")
        return str(path), path, None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>", None, bytes(source)
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        name = str(name) if isinstance(name, (str, os.PathLike)) else "<file object>"
        try:
            data = source.read()
        except OSError as exc:
            raise VideoError(f"{name}: could not be read ({exc})") from exc
        if isinstance(data, str):
            raise VideoError(f"{name}: file object is in text mode; open it with 'rb'")
        return name, None, bytes(data)
    raise TypeError(f"source must be a path, bytes or a binary file object, not {type(source).__name__}")


_SNIFF_BYTES = 512  # enough for every signature below, and to tell text from binary

# First bytes of the formats we hand on. Anything else is refused here rather than passed to
# decord, so garbage never reaches the native decoder.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
                b"II*\x00", b"MM\x00*")
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # the EBML header that starts Matroska / WebM
_MATROSKA_SEGMENT = b"\x18\x53\x80\x67"
_VIDEO_MAGIC = (_EBML_MAGIC,                 # Matroska / WebM
                b"FLV",                      # Flash video
                b"OggS",                     # Ogg
                b"\x30\x26\xb2\x75\x8e\x66\xcf\x11",  # ASF / WMV
                b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")  # MPEG program stream / video
_ISOBMFF_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")  # MP4 / MOV
_IMAGE_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")  # ftyp brands of stills


def _sniff(head: bytes, name: str) -> str:
    """Classify by magic bytes: 'image', 'isobmff' (mp4/mov), 'video', or raise VideoError."""
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head[4:8] in _ISOBMFF_BOXES:
        return "image" if head[4:8] == b"ftyp" and head[8:12] in _IMAGE_BRANDS else "isobmff"
    if head.startswith(_VIDEO_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "video"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:  # MPEG-TS: a sync byte every 188
        return "video"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            looks_text = exc.start >= len(head) - 3  # only a multi-byte character cut at the end
        else:
            looks_text = True
        if looks_text:
            raise VideoError(f"{name}: this looks like a text file, not a video or image "
                             f"(it starts with {head[:24]!r})")
    raise VideoError(f"{name}: not a recognised video or image format (it starts with {head[:12].hex(' ')}); "
                     "expected e.g. MP4/MOV, MKV/WebM, AVI, FLV, MPEG, or PNG/JPEG/GIF/BMP/TIFF/WebP")


def _ebml_size(f: BinaryIO, pos: int, name: str) -> tuple[int | None, int]:
    """The EBML variable-length size at ``pos`` (None: "unknown", as a live recording writes
    it) and the position after it."""
    f.seek(pos)
    first = f.read(1)
    if not first or first[0] == 0:
        raise VideoError(f"{name}: the file is corrupt or truncated (no valid Matroska element size at byte {pos})")
    length = 8 - first[0].bit_length() + 1
    rest = f.read(length - 1)
    if len(rest) < length - 1:
        raise VideoError(f"{name}: the file is truncated (it ends inside a Matroska element header at byte {pos})")
    value = first[0] & (0xFF >> length)
    for byte in rest:
        value = value << 8 | byte
    return (None if value == (1 << 7 * length) - 1 else value), pos + length


def _check_matroska(f: BinaryIO, size: int, name: str) -> None:
    """A Matroska / WebM file announces its Segment's size at the start (a muxer that knows it,
    as one writing a file does): a cut-off copy is caught here, where decord would decode the
    frames that are left and sample them all from the start of the video."""
    header_size, pos = _ebml_size(f, len(_EBML_MAGIC), name)
    if header_size is None:
        return
    pos += header_size
    f.seek(pos)
    if f.read(4) != _MATROSKA_SEGMENT:
        return  # not the layout this check knows: decord judges it
    segment_size, start = _ebml_size(f, pos + 4, name)
    if segment_size is not None and start + segment_size > size:
        raise VideoError(f"{name}: the file is truncated: its Matroska segment needs {start + segment_size} bytes "
                         f"but the file ends after {size} bytes (was the upload or copy cut short?)")


def _check_isobmff(f: BinaryIO, size: int, name: str) -> None:
    """Walk the top-level boxes of an MP4/MOV to catch truncated or incomplete files early.

    A cut-off upload is the common failure: either the last box runs past the end of the
    file, or the 'moov' box (the index, often written last) is missing. decord would only say
    "Invalid data found" or "av_read_frame failed", which does not tell a person what to fix.
    """
    pos, boxes = 0, []
    while pos < size and len(boxes) < 10_000:
        f.seek(pos)
        header = f.read(16)
        if len(header) < 8:
            raise VideoError(f"{name}: the file is truncated (it ends inside a box header at byte {pos})")
        box_size, box_type = int.from_bytes(header[:4], "big"), header[4:8]
        if box_size == 1:  # 64-bit size follows the type
            if len(header) < 16:
                raise VideoError(f"{name}: the file is truncated (it ends inside a box header at byte {pos})")
            box_size = int.from_bytes(header[8:16], "big")
        elif box_size == 0:  # box runs to the end of the file
            box_size = size - pos
        label = box_type.decode("latin-1")
        if box_size < 8:
            raise VideoError(f"{name}: the file is corrupt (box {label!r} at byte {pos} has size {box_size})")
        if pos + box_size > size:
            raise VideoError(f"{name}: the file is truncated: box {label!r} needs {box_size} bytes from byte "
                             f"{pos} but the file ends after {size} bytes (was the upload or copy cut short?)")
        boxes.append(box_type)
        pos += box_size
    if b"moov" not in boxes:
        raise VideoError(f"{name}: the file is incomplete: it has no 'moov' box (the index of an MP4/MOV); "
                         "it was probably truncated or is still being written")


@dataclass(frozen=True)
class VideoHeader:
    """What a video's container says about its largest video stream, before any decoding."""

    width: int
    height: int


def probe_video(src: Path | BinaryIO, name: str) -> VideoHeader:
    """Read the container header with PyAV; raise :class:`VideoError` for a file FFmpeg cannot
    open or one without a video stream. A file object is left at its start."""
    import av

    try:
        with av.open(str(src) if isinstance(src, Path) else src, metadata_errors="ignore") as container:
            kinds = sorted({stream.type for stream in container.streams})
            sizes = [(s.codec_context.width, s.codec_context.height) for s in container.streams.video
                     if s.codec_context is not None]
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{name}: could not be decoded as a video; the file may be corrupt or truncated "
                         f"(FFmpeg: {exc})") from exc
    finally:
        if not isinstance(src, Path):
            src.seek(0)
    if not kinds:
        raise VideoError(f"{name}: could not be decoded as a video: it has no streams at all (no video, no audio); "
                         "the file holds no media or is corrupt")
    if not sizes:
        raise VideoError(f"{name}: the file has no video stream (it holds only {' and '.join(kinds)}); "
                         "send a video or an image")
    width, height = max(sizes, key=lambda wh: wh[0] * wh[1])
    return VideoHeader(width, height)


def _load_video(src: Path | BinaryIO, name: str, num_frames: int, max_frame_pixels: int | None = None,
                cfg: PreprocessorConfig | None = None) -> Frames:
    """Decode ``num_frames`` frames sampled with :func:`get_index`, as PLLaVA's demo does, a
    group at a time (:func:`_decode_group`); with ``cfg`` each group is preprocessed as soon as
    it is decoded and ``frames`` holds the pixel values."""
    header = probe_video(src, name)
    _check_frame_size(name, "video's frames are", header.width, header.height, max_frame_pixels)
    if cfg is not None:  # from the header, before any frame is decoded
        check_aspect_ratio(name, "video's frames are", header.width, header.height, cfg.shortest_edge)
    try:
        # Imported here so that preprocessing (and servers that only preprocess) work where
        # decord has no wheel; only decoding a video needs it.
        import decord
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise VideoError(f"{name}: decoding videos needs the 'decord' package ({exc})") from exc
    # decord reads a file object by copying it to memory; a path lets FFmpeg read the file.
    uri = str(src) if isinstance(src, Path) else src
    group = max(1, min(MAX_DECODE_GROUP, DECODE_GROUP_BYTES // max(1, header.width * header.height * 3)))
    out: np.ndarray | None = None
    try:
        reader = decord.VideoReader(uri, ctx=decord.cpu(0))
        total = len(reader)
        indices = get_index(total, num_frames)
        fps = float(reader.get_avg_fps())
        for start in range(0, num_frames, group):
            # Same pixels as the reference's one-at-a-time ``reader[i].asnumpy()`` (and as one
            # get_batch of them all), a group per call: only one group is held at full size.
            part = _decode_group(reader, indices[start:start + group], name, header, cfg)
            if out is None:
                out = np.empty((num_frames,) + part.shape[1:], part.dtype)
            elif part.shape[1:] != out.shape[1:]:
                raise VideoError(f"{name}: decoder returned frames of shape {part.shape[1:]} after frames of "
                                 f"shape {out.shape[1:]}; the video's frame size changes")
            out[start:start + len(part)] = part
            del part
    except VideoError:
        raise
    except AssertionError as exc:  # decord asserts a positive frame count
        raise VideoError(f"{name}: the video has no decodable frames ({exc})") from exc
    except (RuntimeError, ValueError, IndexError, decord.DECORDError) as exc:
        if "DECORDArrayCopyFromTo" in str(exc) and header.width < NARROW_VIDEO_WIDTH:
            raise _too_narrow(name, header) from exc
        # decord prefixes "[time] /its/source.cc:line: "; keep only what FFmpeg/decord said.
        reason = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(exc)).strip().splitlines() or [type(exc).__name__]
        raise VideoError(f"{name}: could not be decoded as a video; the file may be corrupt or truncated "
                         f"(decord: {reason[-1][:300]})") from exc
    return Frames(frames=out, indices=tuple(indices), total_frames=total, fps=fps, is_image=False)


def _decode_group(reader, indices: list[int], name: str, header: VideoHeader,
                  cfg: PreprocessorConfig | None) -> np.ndarray:
    """Frames ``indices`` of ``reader`` (preprocessed with ``cfg``); the full-size frames are
    this function's alone, so they are freed when it returns."""
    frames = reader.get_batch(indices).asnumpy()
    if frames.ndim == 4 and frames.shape[-1] != 3 and header.width < NARROW_VIDEO_WIDTH:
        raise _too_narrow(name, header)
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"{name}: decoder returned frames of shape {frames.shape} and dtype {frames.dtype}, "
                         f"expected ({len(indices)}, H, W, 3) uint8")
    return frames if cfg is None else preprocess(frames, cfg, name)


def _too_narrow(name: str, header: VideoHeader) -> VideoError:
    return VideoError(f"{name}: the video is only {header.width}x{header.height} pixels, too small: the video "
                      "decoder cannot return frames this narrow; send a larger video, or a frame of it as an "
                      "image (images have no lower size limit)")


def _load_image(src: Path | BinaryIO, name: str, max_frame_pixels: int | None = None,
                cfg: PreprocessorConfig | None = None) -> Frames:
    """Read a still image as one RGB frame (see :func:`read_image`); with ``cfg``, preprocessed."""
    frame = read_image(src, name, max_frame_pixels=max_frame_pixels)[None]
    if cfg is not None:
        check_aspect_ratio(name, "image is", frame.shape[2], frame.shape[1], cfg.shortest_edge)
    frames = frame.copy() if cfg is None else preprocess(frame, cfg, name)
    return Frames(frames=frames, indices=(0,), total_frames=1, fps=0.0, is_image=True)


def read_image(src: Path | BinaryIO, name: str, formats: Sequence[str] | None = None,
               max_frame_pixels: int | None = None) -> np.ndarray:
    """Decode one image to an (H, W, 3) uint8 RGB array.

    EXIF orientation is applied so a phone photo is upright, as a person sees it. Transparency
    is composited on white, as transformers' ``convert_to_rgb`` does; 16-bit grayscale keeps
    its top 8 bits instead of being clipped at 255. Animated images give their first frame.
    ``formats`` (PIL format names) limits the decoders PIL may try; others are refused.
    Larger than ``max_frame_pixels`` (from the header, before decoding) is refused too. Any
    failure of the decoder (corrupt data makes Pillow raise more than OSError) is a VideoError.
    """
    try:
        with Image.open(src, formats=formats) as img:
            _check_frame_size(name, "image is", *img.size, max_frame_pixels)  # from the header, before decoding
            img.load()  # decode now: truncated or corrupt data fails here, not later
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise VideoError(f"{name}: refused as a possible decompression bomb: {exc}") from exc
    except VideoError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types on corrupt data (TypeError, struct.error, ...)
        reason = f"{exc}" if isinstance(exc, (OSError, SyntaxError, ValueError)) else f"{type(exc).__name__}: {exc}"
        raise VideoError(f"{name}: could not be read as an image; it may be corrupt or truncated ({reason})") from exc
    frame = np.asarray(rgb, dtype=np.uint8)
    if frame.ndim != 3 or frame.shape[-1] != 3 or 0 in frame.shape:
        raise VideoError(f"{name}: image decoded to shape {frame.shape}, expected (H, W, 3)")
    return frame


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        high = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(high)
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------- preprocessing

def pllava_resize_size(height: int, width: int, shortest_edge: int = 336) -> tuple[int, int]:
    """Output (H, W) of PLLaVA's ``resize_crop_longshort`` for one video of H x W frames.

    With short side s0, long side l0 and r = l0/s0 (float, as in the reference):
    s = max(shortest_edge, min(s0, int(min(640, l0) / r))), long side int(s * l0 / s0).
    So videos are brought to a long side of at most about 640, but the short side never goes
    below ``shortest_edge``. The reference also passes max_size=9999, which cannot take
    effect: it only bites for a long side > 9999, where the short side would fall below
    ``shortest_edge`` and the reference then recomputes without it. Its "center crop of the
    long side" then keeps the first int(s * r) pixels of it (:func:`pllava_kept_size`). The
    long side grows with the aspect ratio (``shortest_edge`` x ratio), which is why
    :func:`preprocess` refuses ratios over :data:`MAX_ASPECT_RATIO`.
    """
    short, long = min(height, width), max(height, width)
    rate = long / short
    s = max(shortest_edge, min(short, int(min(PLLAVA_MAX_LONG_EDGE, long) / rate)))
    return _shortest_edge_size(height, width, s)


def pllava_kept_size(height: int, width: int, shortest_edge: int = 336) -> tuple[int, int]:
    """(H, W) of a frame after :func:`pllava_resize_size` and the reference's crop of the long
    side, which keeps its first int(s * r) pixels (r = l0 / s0 as a float): one pixel fewer
    than the resize gives for some sizes, where the two roundings part (126x153 -> 336x408,
    kept 336x407; ~0.2% of sizes), none for the usual ones."""
    new_h, new_w = pllava_resize_size(height, width, shortest_edge)
    kept = int(min(new_h, new_w) * (max(height, width) / min(height, width)))
    return (min(new_h, kept), new_w) if height > width else (new_h, min(new_w, kept))


def clip_resize_size(height: int, width: int, shortest_edge: int = 336) -> tuple[int, int]:
    """Output (H, W) of the CLIP processor's resize: short side -> shortest_edge, long side truncated."""
    return _shortest_edge_size(height, width, shortest_edge)


def _shortest_edge_size(height: int, width: int, new_short: int) -> tuple[int, int]:
    # transformers' get_resize_output_image_size(default_to_square=False): the long side is
    # int(new_short * long / short), evaluated in that order (truncation, not rounding).
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(new_short * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_box(height: int, width: int, crop_height: int, crop_width: int) -> tuple[int, int]:
    """(top, left) of a center crop, as transformers computes it: floor((size - crop) / 2)."""
    return (height - crop_height) // 2, (width - crop_width) // 2


def resize_frames(frames: np.ndarray, size: tuple[int, int], resample: int = PLLAVA_RESAMPLE) -> np.ndarray:
    """Resize (T, H, W, C) uint8 frames to ``size`` = (H', W') with PIL, frame by frame.

    PIL is the reference's resizer (transformers converts uint8 numpy -> PIL -> resize -> numpy);
    its bicubic filter is antialiased when shrinking, so other libraries give other pixels.
    """
    height, width = size
    if frames.shape[1:3] == (height, width):
        return frames  # PIL returns an unchanged copy for a same-size resize
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), resample=resample))
    return out


def center_crop(frames: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Center-crop (T, H, W, C) frames; like transformers, pad with zeros when they are smaller."""
    _, height, width, _ = frames.shape
    top, left = center_crop_box(height, width, crop_height, crop_width)
    if top >= 0 and left >= 0:
        return frames[:, top:top + crop_height, left:left + crop_width]
    new_h, new_w = max(crop_height, height), max(crop_width, width)
    pad_top, pad_left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    canvas = np.zeros((frames.shape[0], new_h, new_w, frames.shape[3]), dtype=frames.dtype)
    canvas[:, pad_top:pad_top + height, pad_left:pad_left + width] = frames
    top, left = top + pad_top, left + pad_left
    return canvas[:, max(0, top):min(new_h, top + crop_height), max(0, left):min(new_w, left + crop_width)]


def preprocess(frames: np.ndarray, cfg: PreprocessorConfig | None = None, name: str = "") -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames of one video -> float32 (T, 3, crop_h, crop_w) pixel values.

    PLLaVA's long/short resize (always applied: it belongs to PLLaVA's processor, not to the
    CLIP config), then the CLIP processor steps, each gated by its ``do_*`` flag: resize the
    shortest edge, center crop, rescale, normalize. The arithmetic follows transformers so the
    values match its ``CLIPImageProcessor`` (PIL backend) bit for bit: rescale in float64 then
    cast to float32, normalize in float32. ``do_convert_rgb`` has nothing to do here: frames
    are RGB already (:func:`load_frames` converts images). Frames whose aspect ratio is over
    :data:`MAX_ASPECT_RATIO` raise :class:`VideoError` (prefixed with ``name``), before any resize.
    Each frame is processed on its own, so preprocessing frames in groups gives the same values.
    """
    cfg = cfg or PreprocessorConfig()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, "
                         f"got shape {frames.shape} dtype {frames.dtype}")
    _, height, width, _ = frames.shape
    check_aspect_ratio(name, "frames are", width, height, cfg.shortest_edge)
    frames = resize_frames(frames, pllava_resize_size(height, width, cfg.shortest_edge), PLLAVA_RESAMPLE)
    kept_h, kept_w = pllava_kept_size(height, width, cfg.shortest_edge)
    frames = frames[:, :kept_h, :kept_w]  # (the first pixels of the long side, as the reference keeps)
    if cfg.do_resize:
        frames = resize_frames(frames, clip_resize_size(*frames.shape[1:3], cfg.shortest_edge), cfg.resample)
    if cfg.do_center_crop:
        frames = center_crop(frames, *cfg.crop_size)
    table = pixel_table(cfg)
    pixels = np.empty((frames.shape[0], 3) + frames.shape[1:3], np.float32)  # (T, 3, H, W)
    for channel in range(3):
        np.take(table[channel], frames[..., channel], out=pixels[:, channel])
    return pixels


def pixel_table(cfg: PreprocessorConfig) -> np.ndarray:
    """(3, 256) float32: each channel's value of every uint8 after rescale and normalize, in
    transformers' arithmetic (rescale in float64 then cast to float32, normalize in float32),
    so a lookup gives its values bit for bit. Per pixel that arithmetic made a float64 copy of
    the frames and three float32 ones (16 frames at 336 px: ~0.2 s of a 0.3 s preprocess)."""
    values = np.arange(256, dtype=np.uint8)
    pixels = (values.astype(np.float64) * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale \
        else values.astype(np.float32)
    table = np.repeat(pixels[None], 3, axis=0)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return table.astype(np.float32)


def load_video(source: Source, num_frames: int, cfg: PreprocessorConfig | None = None,
               max_frame_pixels: int | None = None) -> tuple[np.ndarray, Frames]:
    """:func:`load_frames` then :func:`preprocess`: (pixel_values, frames metadata).

    pixel_values is (num_frames, 3, crop_h, crop_w) for a video and (1, 3, crop_h, crop_w)
    for a still image; repeating an image to ``num_frames`` is the model's job.
    """
    frames = load_frames(source, num_frames, max_frame_pixels)
    return preprocess(frames.frames, cfg), frames
