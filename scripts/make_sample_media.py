"""Make the sample media in samples/: three short clips and a still image, all synthetic.

    python scripts/make_sample_media.py [OUT_DIR]        # default: samples/ beside this script

The demo and the tests use these files, so a fresh clone needs nothing beside it. Everything
is drawn here from seeded numpy noise and PIL shapes (no third-party footage, nothing to
license) and encoded with PyAV's libx264 on one thread, so the same numpy, Pillow and PyAV
(pinned in the `test` extra) give the same bytes again; tests/test_samples.py checks that.

What the pictures hold, so codecs and models have real content to work on: a colour gradient
whose hues drift over time, a low-frequency noise texture that pans like a camera, and
shapes that move, rotate, change colour and cross each other. Sizes are even (H.264 4:2:0
needs that) but not multiples of 16, the still image is odd in both sides, and one clip is
portrait. The frame counts and rates match what the tests assert:

| file | size (W x H) | frames | fps |
|---|---|---|---|
| orbit.mp4    | 322 x 182 | 160 | 25 |
| portrait.mp4 | 190 x 338 | 300 | 30 |
| short.mp4    | 250 x 142 |  12 | 12 |
| still.jpg    | 333 x 241 |   - |  - |
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "samples"
CRF = 30            # x264 quality: small files, still clearly the drawn picture


@dataclass(frozen=True)
class Clip:
    name: str
    width: int
    height: int
    frames: int
    fps: int
    draw: Callable[["Canvas", int], None]   # draws frame t onto the canvas
    seed: int


# --------------------------------------------------------------------------- drawing helpers

class Canvas:
    """A frame-sized background (gradient + panning texture) with PIL drawing on top."""

    def __init__(self, width: int, height: int, frames: int, seed: int):
        self.width, self.height, self.frames = width, height, frames
        rng = np.random.default_rng(seed)
        # Noise at 1/6 resolution, bicubically enlarged: texture with structure (a codec can
        # predict it when it pans) instead of per-pixel grain (which would only cost bytes).
        tex_w, tex_h = 2 * width, 2 * height
        small = rng.integers(0, 256, (tex_h // 6 + 1, tex_w // 6 + 1), dtype=np.uint8)
        big = Image.fromarray(small).resize((tex_w, tex_h), Image.BICUBIC)
        self.texture = (np.asarray(big, dtype=np.float32) - 128.0) * 0.35   # about +-45
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        self.u, self.v = xs / width, ys / height
        self.image: Image.Image | None = None
        self.draw: ImageDraw.ImageDraw | None = None

    def background(self, t: int, pan: tuple[int, int], hue_speed: float) -> None:
        phase = 2 * math.pi * hue_speed * t / self.frames
        r = 0.5 + 0.5 * np.sin(2 * math.pi * self.u + phase)
        g = 0.5 + 0.5 * np.sin(2 * math.pi * (self.v + 0.33) + 0.7 * phase)
        b = 0.5 + 0.5 * np.cos(2 * math.pi * (self.u + self.v) - phase)
        rgb = np.stack([r, g, b], axis=-1) * 180.0 + 40.0
        dx, dy = pan
        ox, oy = (dx * t) % self.width, (dy * t) % self.height
        rgb += self.texture[oy:oy + self.height, ox:ox + self.width, None]
        self.image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        self.draw = ImageDraw.Draw(self.image)

    def disc(self, cx: float, cy: float, radius: float, colour) -> None:
        self.draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)

    def ring(self, cx: float, cy: float, radius: float, colour, width: int) -> None:
        self.draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=width)

    def square(self, cx: float, cy: float, half: float, angle: float, colour) -> None:
        corners = [(cx + half * math.cos(angle + k * math.pi / 2) * math.sqrt(2),
                    cy + half * math.sin(angle + k * math.pi / 2) * math.sqrt(2)) for k in range(4)]
        self.draw.polygon(corners, fill=colour)

    def progress(self, t: int, colour=(250, 250, 250)) -> None:
        """A bar along the bottom that grows with time: every frame differs from the last."""
        length = round((t + 1) / self.frames * self.width)
        self.draw.rectangle([0, self.height - 4, length - 1, self.height - 1], fill=colour)

    def pixels(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8)


def _hsv(h: float, s: float = 0.85, v: float = 0.95) -> tuple[int, int, int]:
    i, f = int(h * 6) % 6, (h * 6) % 1
    p, q, u = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, u, p), (q, v, p), (p, v, u), (p, q, v), (u, p, v), (v, p, q)][i]
    return round(r * 255), round(g * 255), round(b * 255)


def _bounce(x0: float, speed: float, t: int, lo: float, hi: float) -> float:
    """Position of a point moving at ``speed`` between walls ``lo`` and ``hi``, reflecting."""
    span = hi - lo
    pos = (x0 - lo + speed * t) % (2 * span)
    return lo + (pos if pos <= span else 2 * span - pos)


# --------------------------------------------------------------------------- the clips

def draw_orbit(c: Canvas, t: int) -> None:
    """Landscape: a ball bouncing, two balls orbiting the centre, a spinning square crossing."""
    w, h = c.width, c.height
    c.background(t, pan=(1, 0), hue_speed=1.0)
    c.disc(_bounce(20, 3.1, t, 14, w - 14), _bounce(30, 2.3, t, 14, h - 18), 14, (220, 40, 40))
    for k, colour in enumerate([(40, 90, 230), (30, 200, 90)]):
        a = 2 * math.pi * (t / 80 + k / 2)
        c.disc(w / 2 + 70 * math.cos(a), h / 2 + 45 * math.sin(a), 11 - 3 * k, colour)
    c.square(-30 + (w + 60) * t / c.frames, h * 0.3, 16, t * 0.12, _hsv(t / c.frames))
    c.progress(t)


def draw_portrait(c: Canvas, t: int) -> None:
    """Portrait: a pendulum swinging, a ring pulsing, a disc rising, stripes falling."""
    w, h = c.width, c.height
    c.background(t, pan=(0, 2), hue_speed=1.5)
    for k in range(5):   # horizontal stripes moving down
        y = (t * 2 + k * h / 5) % h
        c.draw.rectangle([0, y, w, y + 5], fill=_hsv(k / 5, 0.5, 0.9))
    angle = 0.9 * math.sin(2 * math.pi * t / 60)
    bx, by = w / 2 + 110 * math.sin(angle), 40 + 110 * math.cos(angle)
    c.draw.line([(w / 2, 40), (bx, by)], fill=(30, 30, 30), width=3)
    c.disc(bx, by, 16, (240, 200, 30))
    c.ring(w / 2, h * 0.72, 20 + 14 * math.sin(2 * math.pi * t / 45), _hsv(t / 300 + 0.5), 5)
    c.disc(w * 0.25, h - (t * 1.3) % h, 9, (200, 50, 200))
    c.progress(t)


def draw_short(c: Canvas, t: int) -> None:
    """Twelve frames: a disc crossing left to right, changing colour each frame."""
    w, h = c.width, c.height
    c.background(t, pan=(3, 1), hue_speed=2.0)
    c.disc(20 + (w - 40) * t / (c.frames - 1), h / 2, 18, _hsv(t / c.frames))
    c.square(w * 0.7, h * 0.3, 12, -t * 0.3, (245, 245, 245))
    c.progress(t)


CLIPS = (
    Clip("orbit.mp4", 322, 182, 160, 25, draw_orbit, seed=1),
    Clip("portrait.mp4", 190, 338, 300, 30, draw_portrait, seed=2),
    Clip("short.mp4", 250, 142, 12, 12, draw_short, seed=3),
)
STILL = ("still.jpg", 333, 241)


def render(clip: Clip) -> list[np.ndarray]:
    canvas = Canvas(clip.width, clip.height, clip.frames, clip.seed)
    out = []
    for t in range(clip.frames):
        clip.draw(canvas, t)
        out.append(canvas.pixels())
    return out


def write_mp4(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """H.264 (yuv420p) in MP4, one encoder thread and no B-frame reordering surprises:
    the same input gives the same bytes."""
    import av   # the `test` extra; only needed to (re)make the clips

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.options = {"crf": str(CRF), "preset": "medium", "threads": "1"}
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def still_image() -> np.ndarray:
    name, width, height = STILL
    c = Canvas(width, height, 1, seed=4)
    c.background(0, pan=(0, 0), hue_speed=0.0)
    c.disc(90, 100, 45, (230, 60, 40))
    c.square(230, 150, 40, 0.4, (40, 120, 230))
    c.ring(250, 60, 30, (250, 230, 60), 7)
    c.draw.line([(10, height - 20), (width - 10, 15)], fill=(20, 20, 20), width=4)
    return c.pixels()


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    for clip in CLIPS:
        path = out / clip.name
        write_mp4(path, render(clip), clip.fps)
        print(f"{path}: {clip.width}x{clip.height}, {clip.frames} frames at {clip.fps} fps, "
              f"{path.stat().st_size} bytes")
    path = out / STILL[0]
    Image.fromarray(still_image()).save(path, format="JPEG", quality=90)
    print(f"{path}: {STILL[1]}x{STILL[2]}, {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
