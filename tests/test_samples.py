"""The repository carries its own sample media and reads nothing from beside itself.

samples/ is made by scripts/make_sample_media.py (synthetic pictures, PyAV's libx264) and
committed, so neither the tests nor the demo need anything outside the clone.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
NAMES = ("orbit.mp4", "portrait.mp4", "short.mp4", "still.jpg")


def test_samples_are_small():
    sizes = {name: (SAMPLES / name).stat().st_size for name in NAMES}
    assert all(size > 10_000 for size in sizes.values()), sizes   # real content, not stubs
    assert sum(sizes.values()) < 2_000_000, sizes


def test_the_script_makes_the_committed_samples(tmp_path):
    """The clips are remade, not byte for byte (libm's sin/cos and x264's float rate control
    round differently on other CPUs: a shape moves by a pixel, a quantiser by a step), but
    with the same frames, size and rate, and pictures that differ only by such rounding."""
    # Needs PyAV (the test extra), as remaking the clips does.
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_media.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)
    for name in NAMES:
        made, committed = decoded(tmp_path / name), decoded(SAMPLES / name)
        assert made["rate"] == committed["rate"] and len(made["frames"]) == len(committed["frames"]), name
        for a, b in zip(made["frames"], committed["frames"]):
            assert a.shape == b.shape, name
            assert np.abs(a - b).mean() < 8, \
                f"samples/{name} is not what scripts/make_sample_media.py makes; rerun it and commit the result"


def decoded(path: Path) -> dict:
    """Every picture of a clip or still as int16 RGB, and the frame rate."""
    if path.suffix == ".jpg":
        return {"rate": None, "frames": [np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)]}
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24").astype(np.int16) for f in container.decode(stream)]
        return {"rate": stream.average_rate, "frames": frames}


def test_nothing_in_the_repository_reads_beside_it():
    # Spelled in pieces so this file does not find itself.
    needles = ["../" + "shared", "shared/" + "videos", "PLLAVA_" + "SPEC"]
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    hits = []
    for name in filter(None, files.decode().split("\0")):
        path = REPO / name
        if not path.is_file() or path.suffix in {".mp4", ".jpg", ".png"}:
            continue
        text = path.read_text(errors="replace")
        hits += [f"{name}: {needle}" for needle in needles if needle in text]
    assert not hits, hits
