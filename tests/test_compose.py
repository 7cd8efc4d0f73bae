"""docker-compose, for real (scripts/compose_smoke.sh): build both images, run two encoder
replicas and the decoder, caption a video through the decoder's port published on
127.0.0.1, check that both encoder replicas served work, take the stack down.

Needs root and a Docker engine; the script installs Debian's docker.io, docker-compose and
debootstrap and starts dockerd when they are missing, and builds the local base image when
no registry is reachable. About 20 s with warm image caches, 1.5-2 min cold.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.docker
def test_compose_two_encoder_replicas_serve_a_caption(videos_dir):
    done = subprocess.run(["bash", str(REPO / "scripts" / "compose_smoke.sh"), str(videos_dir / "orbit.mp4")],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    output = done.stdout + done.stderr
    print(output[-6000:])
    assert done.returncode == 0, output[-6000:]
    assert "compose smoke test passed" in done.stdout
    assert re.search(r"encoder replicas that served work: 2 of 2", done.stdout)
    # the stack is gone afterwards
    left = subprocess.run(["docker", "ps", "-q", "--filter", "label=com.docker.compose.project=pllava-smoke"],
                          capture_output=True, text=True, timeout=60)
    assert left.returncode == 0 and left.stdout.strip() == ""
