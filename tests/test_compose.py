"""docker-compose, for real (scripts/compose_smoke.sh): build the one image both servers run,
run two encoder replicas and the decoder, caption a video through the decoder's port
published on 127.0.0.1, check that both encoder replicas served work, take the stack down
and clean up.

Needs root and a Docker engine; the script installs Debian's docker.io, docker-compose and
debootstrap and starts dockerd when they are missing, and builds the local base image when
no registry is reachable. It removes the images it built and stops a dockerd it started, so
every run builds from scratch: a few minutes (SMOKE_KEEP_IMAGES=1 keeps them for reruns).
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE = "pllava-serve:smoke"


def _docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.docker
def test_compose_two_encoder_replicas_serve_a_caption(videos_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("SMOKE_KEEP_IMAGES", "SMOKE_KEEP_DOCKERD", "PLLAVA_IMAGE")}
    daemon_before = _docker("info").returncode == 0
    done = subprocess.run(["bash", str(REPO / "scripts" / "compose_smoke.sh"), str(videos_dir / "orbit.mp4")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    output = done.stdout + done.stderr
    print(output[-6000:])
    assert done.returncode == 0, output[-6000:]
    assert "compose smoke test passed" in done.stdout
    assert re.search(r"encoder replicas that served work: 2 of 2", done.stdout)
    assert f"images of the running containers: {IMAGE}\n" in done.stdout   # one image, both services

    # Cleaned up: the containers, the image it built, and the daemon if it started one.
    assert "cleanup: containers of project pllava-smoke left: 0" in done.stdout
    assert f"cleanup: removed the image {IMAGE}" in done.stdout
    if daemon_before:
        assert "stopped the dockerd" not in done.stdout
        left = _docker("ps", "-aq", "--filter", "label=com.docker.compose.project=pllava-smoke")
        assert left.returncode == 0 and left.stdout.strip() == ""
        assert _docker("image", "inspect", IMAGE).returncode != 0
    else:
        assert "cleanup: stopped the dockerd this run started" in done.stdout
        assert _docker("info").returncode != 0
