"""Shared fixtures: a tiny random checkpoint in the llava-hf layout and the repository's
sample media; and the docker-compose smoke run, started beside the other tests."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Committed with the code (scripts/make_sample_media.py makes them): orbit.mp4 (322x182, 25 fps,
# 160 frames), portrait.mp4 (190x338, 30 fps, 300 frames), short.mp4 (250x142, 12 fps,
# 12 frames) and still.jpg (333x241).
SAMPLES = REPO / "samples"


@pytest.fixture(scope="session")
def videos_dir() -> Path:
    """The folder of sample clips and the still image, inside the repository."""
    assert (SAMPLES / "orbit.mp4").exists(), \
        f"the sample media are missing from {SAMPLES}; python scripts/make_sample_media.py makes them"
    return SAMPLES


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """``pllava make-tiny --seed 0``: 4 frames pooled to (4,12,12) = 576 visual tokens."""
    from pllava.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-pllava"), seed=0)


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory) -> Path:
    """A random LLaVA saved by transformers itself (the reference's own layout and config),
    with grouped-query attention and a 4x4 patch grid."""
    from reference import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("hf-llava"), seed=0)


class ComposeSmoke:
    """``scripts/compose_smoke.sh`` run in the background from the start of the session, when
    a test marked ``docker`` is selected: most of its ~5 minutes are package and image
    downloads and builds, which need little CPU, so the other tests run meanwhile instead of
    after it. The test reads its outcome (:meth:`result`)."""

    def __init__(self, video: Path):
        self.daemon_before = _has_docker() and subprocess.run(["docker", "info"], capture_output=True,
                                                              timeout=60).returncode == 0
        env = {k: v for k, v in os.environ.items() if k not in ("SMOKE_KEEP_IMAGES", "SMOKE_KEEP_DOCKERD",
                                                                "PLLAVA_IMAGE")}
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(["bash", str(REPO / "scripts" / "compose_smoke.sh"), str(video)], cwd=REPO,
                                        env=env, stdout=self._out, stderr=self._err, text=True,
                                        start_new_session=True)

    def result(self, timeout: float) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once the script has ended (TimeoutExpired past ``timeout``)."""
        code = self.process.wait(timeout)
        outputs = []
        for stream in (self._out, self._err):
            stream.seek(0)
            outputs.append(stream.read())
        return code, outputs[0], outputs[1]

    def stop(self) -> None:
        """An interrupted session: the script's own cleanup takes the stack down (SIGINT)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(300)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def _has_docker() -> bool:
    from shutil import which
    return which("docker") is not None


_COMPOSE_SMOKE = pytest.StashKey[ComposeSmoke]()


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected what they deselect
def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("docker") for item in items):
        config.stash[_COMPOSE_SMOKE] = ComposeSmoke(SAMPLES / "orbit.mp4")


def pytest_sessionfinish(session):
    smoke = session.config.stash.get(_COMPOSE_SMOKE, None)
    if smoke is not None:
        smoke.stop()


@pytest.fixture(scope="session")
def compose_smoke(request) -> ComposeSmoke:
    """The compose smoke run started with the session (see :class:`ComposeSmoke`)."""
    return request.config.stash[_COMPOSE_SMOKE]
