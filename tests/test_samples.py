"""The repository carries its own sample media and reads nothing from beside itself.

samples/ is made by scripts/make_sample_media.py (synthetic pictures, PyAV's libx264) and
committed, so neither the tests nor the demo need anything outside the clone.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
NAMES = ("orbit.mp4", "portrait.mp4", "short.mp4", "still.jpg")


def test_samples_are_small():
    sizes = {name: (SAMPLES / name).stat().st_size for name in NAMES}
    assert all(size > 10_000 for size in sizes.values()), sizes   # real content, not stubs
    assert sum(sizes.values()) < 2_000_000, sizes


def test_the_script_makes_the_committed_samples(tmp_path):
    # Needs PyAV (the test extra), as remaking the clips does.
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_media.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)
    for name in NAMES:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), \
            f"samples/{name} is not what scripts/make_sample_media.py makes; rerun it and commit the result"


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
