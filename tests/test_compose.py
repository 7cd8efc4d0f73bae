"""docker-compose, for real (scripts/compose_smoke.sh): build the one image every server runs,
run two encoder replicas, the decoder and the OpenAI-compatible front end, caption a video
through the decoder's port published on 127.0.0.1 and through the front end's, check that
both encoder replicas served work; run the stack again secured by docker-compose.tls.yml
(mutual TLS and a token on both hops, refusals checked), take it down and clean up.

Needs root and a Docker engine; the script installs Debian's docker.io, docker-compose and
debootstrap and starts dockerd when they are missing, and builds the local base image when
no registry is reachable. It removes the images it built and stops a dockerd it started, so
every run builds from scratch: a few minutes (SMOKE_KEEP_IMAGES=1 keeps them for reruns), which
run beside the other tests: the script starts with the session (tests/conftest.py).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE = "pllava-serve:smoke"


def _docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.docker
def test_compose_two_encoder_replicas_serve_a_caption(compose_smoke):
    """The run started with the session (tests/conftest.py: ComposeSmoke), on samples/orbit.mp4."""
    returncode, stdout, stderr = compose_smoke.result(timeout=2400)
    output = stdout + stderr
    print(output[-6000:])
    assert returncode == 0, output[-6000:]
    assert "compose smoke test passed" in stdout
    assert re.search(r"encoder replicas that served work: 2 of 2", stdout)
    assert re.search(r"OpenAI-compatible API answered: model \S+, \d+ completion tokens", stdout)
    assert f"images of the running containers: {IMAGE}\n" in stdout   # one image, both services

    # Secured by docker-compose.tls.yml: mutual TLS with the token on both hops, refusals named.
    assert re.search(r"captioned 4 times in [\d.]+ s: \{", stdout)
    assert "refused (TLS)" in stdout
    assert stdout.count("refused (UNAUTHENTICATED)") == 2     # no token, a wrong one
    assert "refused (401)" in stdout
    assert "OpenAI-compatible API with the token: model" in stdout
    assert len(re.findall(r"encoder replicas that served work: 2 of 2", stdout)) == 2

    # Cleaned up: the containers, the image it built, and the daemon if it started one.
    assert "cleanup: containers of project pllava-smoke left: 0" in stdout
    assert f"cleanup: removed the image {IMAGE}" in stdout
    if compose_smoke.daemon_before:
        assert "stopped the dockerd" not in stdout
        left = _docker("ps", "-aq", "--filter", "label=com.docker.compose.project=pllava-smoke")
        assert left.returncode == 0 and left.stdout.strip() == ""
        assert _docker("image", "inspect", IMAGE).returncode != 0
    else:
        assert "cleanup: stopped the dockerd this run started" in stdout
        assert _docker("info").returncode != 0


def test_the_openai_front_end_is_wired_into_compose_and_the_image():
    """Static checks (no Docker): the ``openai`` service runs the shared image against the
    decoder service's port and publishes its own port on 127.0.0.1 only; the image installs
    the package and the build context carries it."""
    import tomllib

    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    front, decoder = services["openai"], services["decoder"]
    assert front["image"] == decoder["image"] and front["build"] == decoder["build"]

    def flag(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    assert front["command"][0] == "pllava-openai"
    assert flag(front["command"], "--decoder") == f"dns:///decoder:{flag(decoder['command'], '--port')}"
    assert flag(front["command"], "--host") == "0.0.0.0"
    published = [p for p in front["ports"] if p.endswith(":" + flag(front["command"], "--port"))]
    assert len(published) == 1 and published[0].startswith("127.0.0.1:")
    assert "volumes" not in front  # it holds no model
    assert "decoder" in front["depends_on"]
    # A server that crashes comes back (the README says the restart policy does the job).
    assert {name: s.get("restart") for name, s in services.items()} == dict.fromkeys(services, "unless-stopped")
    # The decoder's compiled graphs live in a named volume, so a recreated container finds them.
    cache = flag(decoder["command"], "--compile-cache")
    assert f"compile-cache:{cache}" in decoder["volumes"]
    assert "compile-cache" in yaml.safe_load((REPO / "docker-compose.yml").read_text())["volumes"]

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pllava-openai"] == "pllava_openai.server:main"
    assert "COPY openai_server /src/openai_server" in (REPO / "docker" / "Dockerfile").read_text()
    assert "!openai_server/" in (REPO / ".dockerignore").read_text().splitlines()
