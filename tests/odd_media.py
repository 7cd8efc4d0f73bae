"""Test helper (not a test module): unusual and hostile media files, made at test time.

Each function returns the file's bytes. PyAV (the test extra) writes the containers;
nothing here is decoded.

- :func:`audio_only` / :func:`no_streams_mp4`: valid files with no video stream;
- :func:`tiny_video`: a valid H.264 clip of any size, down to 1x1;
- :func:`mkv_declaring` / :func:`png_declaring`: decompression bombs, a few KB that declare
  frames of ``width`` x ``height`` pixels;
- :func:`crashing_avi`: a truncated AVI that crashes the process decoding it;
- :func:`tiff_with_rational_strip_offsets`: a corrupt TIFF on which Pillow raises TypeError.
"""
from __future__ import annotations

import io
import zlib

import av
import numpy as np
from PIL import Image


def audio_only(container: str = "mp4") -> bytes:
    """Half a second of silence in AAC, no video stream."""
    out = io.BytesIO()
    with av.open(out, "w", format=container) as c:
        stream = c.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return out.getvalue()


def _box(kind: bytes, payload: bytes) -> bytes:
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


def no_streams_mp4() -> bytes:
    """A well-formed MP4 whose index ('moov') holds a movie header and no track."""
    mvhd = _box(b"mvhd", bytes(12) + (1000).to_bytes(4, "big") + bytes(4) + (0x00010000).to_bytes(4, "big")
                + (0x0100).to_bytes(2, "big") + bytes(70) + (1).to_bytes(4, "big"))
    return _box(b"ftyp", b"isom" + bytes(4) + b"isomiso2mp41") + _box(b"moov", mvhd)


def tiny_video(width: int, height: int, frames: int = 8) -> bytes:
    """An H.264 MP4 of ``frames`` grey frames (4:4:4 when a side is odd, as 4:2:0 needs even)."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as c:
        stream = c.add_stream("libx264", rate=10)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if width % 2 or height % 2 else "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return out.getvalue()


def moving_video(container: str, codec: str, frames: int = 48, size: int = 64) -> bytes:
    """``frames`` frames of a gradient that moves, in ``container`` (e.g. "matroska", "webm")."""
    out = io.BytesIO()
    with av.open(out, "w", format=container) as c:
        stream = c.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        ramp = np.arange(size, dtype=np.uint8)[None, :, None] * 3
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(ramp + 4 * i, (size, size, 3)).copy(), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return out.getvalue()


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def mkv_declaring(width: int, height: int, frames: int = 4) -> bytes:
    """A Matroska video of MJPEG frames whose track header and JPEG headers both say
    ``width`` x ``height``, each frame holding 16x16 pixels of data."""
    out = io.BytesIO()
    with av.open(out, "w", format="matroska") as c:
        stream = c.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        jpeg = _jpeg_declaring(width, height)
        for i in range(frames):
            packet = av.Packet(jpeg)
            packet.stream, packet.pts, packet.dts = stream, i, i
            c.mux(packet)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` but whose image data is one short row."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 8] = width.to_bytes(4, "big")
    data[ihdr + 8:ihdr + 12] = height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))  # the chunk type and its 13 bytes of data
    data[ihdr + 17:ihdr + 21] = crc.to_bytes(4, "big")
    return bytes(data)


def crashing_avi() -> bytes:
    """The first 30% of an MPEG-4 AVI (48 frames of 256x192): decord dies with SIGSEGV on it
    (decord 0.6.0), taking down the process that decodes it: an input that crashes the
    decoder every time."""
    out = io.BytesIO()
    with av.open(out, "w", format="avi") as c:
        stream = c.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 256, 192, "yuv420p"
        for i in range(48):
            frame = np.zeros((192, 256, 3), np.uint8)
            frame[:, (i * 5) % 256:(i * 5) % 256 + 20] = 255
            frame[..., 1] = i * 5
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    data = out.getvalue()
    return data[: int(len(data) * 0.3)]


def tiff_with_rational_strip_offsets() -> bytes:
    """A 32x24 TIFF whose StripOffsets tag claims the type RATIONAL: Pillow raises TypeError
    ("'IFDRational' object cannot be interpreted as an integer") while loading it."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"II*\x00"  # little-endian: IFD offset, then 12-byte entries (tag, type, count, value)
    ifd = int.from_bytes(data[4:8], "little")
    for entry in range(int.from_bytes(data[ifd:ifd + 2], "little")):
        at = ifd + 2 + 12 * entry
        if int.from_bytes(data[at:at + 2], "little") == 273:  # StripOffsets
            data[at + 2:at + 4] = (5).to_bytes(2, "little")   # RATIONAL
            return bytes(data)
    raise AssertionError("Pillow wrote a TIFF without StripOffsets")
