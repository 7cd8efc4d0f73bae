"""Shared fixtures: a tiny random checkpoint in the llava-hf layout and the real videos."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VIDEOS = REPO.parent / "shared" / "videos"


@pytest.fixture(scope="session")
def videos_dir() -> Path:
    assert (VIDEOS / "cooking.mp4").exists(), f"the shared test videos are missing from {VIDEOS}"
    return VIDEOS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """``pllava make-tiny --seed 0``: 4 frames pooled to (4,12,12) = 576 visual tokens."""
    from pllava.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-pllava"), seed=0)
