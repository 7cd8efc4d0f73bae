"""Test videos for the benchmark: N different short clips, and byte-distinct copies of them.

The clips are drawn with the scene code of ``scripts/make_sample_media.py`` (gradients, a
panning texture, moving shapes), each with its own seed, scene, size and frame rate, so every
clip decodes to different pixels and gets different visual tokens. The decoder server caches
visual tokens by the sha256 of the video bytes; :func:`variant` gives a copy of a clip whose
bytes differ (an MP4 ``free`` box appended, which demuxers skip) while its frames are the
same, so each benchmark run through the servers is a cache miss with the same work.
"""
from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: (width, height, frames, fps) per clip, cycled: landscape, portrait and square-ish sizes,
#: even sides (H.264 4:2:0), 2-4 seconds each.
SHAPES = ((320, 180, 60, 24), (192, 336, 72, 24), (256, 192, 48, 16), (352, 198, 75, 25),
          (240, 240, 64, 20), (180, 320, 60, 30), (300, 170, 80, 20), (224, 168, 56, 14))


def _scenes():
    spec = importlib.util.spec_from_file_location("pllava_sample_media", REPO / "scripts" / "make_sample_media.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def make_videos(out_dir: str | Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` different clips ``clip-0.mp4`` ... in ``out_dir``, made once and reused."""
    scenes = _scenes()
    draws = (scenes.draw_orbit, scenes.draw_portrait, scenes.draw_short)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"clip-{seed}-{i}.mp4"
        if not path.exists():
            width, height, frames, fps = SHAPES[i % len(SHAPES)]
            clip = scenes.Clip(path.name, width, height, frames, fps, draws[i % len(draws)],
                               seed=1000 * (seed + 1) + i)
            tmp = path.with_suffix(".tmp.mp4")
            scenes.write_mp4(tmp, scenes.render(clip), fps)
            tmp.rename(path)
        paths.append(path)
    return paths


def variant(path: str | Path, tag: str) -> bytes:
    """The clip's bytes plus a trailing ISO-BMFF ``free`` box holding ``tag``: the same frames,
    another sha256 (so the decoder's visual-token cache misses)."""
    data = Path(path).read_bytes()
    payload = tag.encode()
    return data + struct.pack(">I", 8 + len(payload)) + b"free" + payload
