"""A fresh clone stands alone: `git clone` the repository into an empty folder and run the
README's two commands there (the test command on a fast subset, then the demo) with nothing
beside the clone.

`git clone` takes the committed HEAD, not the working tree. The clone gets its own .venv, and
scripts/bootstrap.sh really runs in it and installs the clone (editable); only the
dependencies come from this checkout's .venv, seen through a .pth line, with pip's package
index switched off, so no MindSpore or torch is downloaded again. About a minute.

    pytest -m clone
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.clone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(folder holding only the clone, the clone, environment for commands run in it)."""
    root = tmp_path_factory.mktemp("fresh")
    clone = root / "pllava"
    subprocess.run(["git", "clone", "--quiet", "--local", str(REPO), str(clone)], check=True, timeout=120)

    # A venv of our own whose site-packages also sees this venv's (a .pth line: the directory
    # is added as is, its own .pth files, among them this checkout's editable install, are not
    # run), so the clone's packages are the ones that import.
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    ours = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    outer = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(ours, "_outer_venv.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))

    cache = tmp_path_factory.mktemp("xdg-cache")   # the demo's tiny checkpoint; not beside the clone
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_NO_CACHE_DIR="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", XDG_CACHE_HOME=str(cache))
    return root, clone, env


def test_fresh_clone_runs_the_tests_and_the_demo(fresh):
    root, clone, env = fresh
    assert sorted(os.listdir(root)) == ["pllava"] and not (root / "shared").exists()
    assert (clone / "samples" / "orbit.mp4").is_file()   # the media travel with the code

    # The README's test command, on a fast subset (bootstrap.sh installs the test extra first).
    tests = subprocess.run(["bash", "scripts/test.sh", "-p", "no:cacheprovider", "tests/test_video.py",
                            "tests/test_config.py", "tests/test_samples.py"],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, (tests.stdout + tests.stderr)[-4000:]
    assert "bootstrap: installing pllava-serve[test]" in tests.stderr
    summary = tests.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in .*", summary), summary   # no failures, errors or skips

    where = subprocess.run([str(clone / ".venv/bin/python"), "-c",
                            "import pllava, pllava_client, pllava_encoder, pllava_decoder, pllava_serving as s; "
                            "print('\\n'.join(m.__file__ for m in (pllava, pllava_client, pllava_encoder, "
                            "pllava_decoder, s)))"],
                           cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(Path(f).is_relative_to(clone) for f in where.stdout.split()), where.stdout

    # The README's demo command, as is: its default video is the clone's samples/orbit.mp4.
    port = _free_port()
    demo = subprocess.run(["bash", "scripts/demo.sh"], cwd=clone, env={**env, "PORT": str(port)},
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-4000:]
    assert f"pllava up: decoder at 127.0.0.1:{port}" in demo.stderr
    assert "demo: pllava-caption orbit.mp4" in demo.stderr
    assert demo.stdout.strip(), "the demo printed no caption"
    with pytest.raises(ConnectionRefusedError):   # the servers are gone
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

    assert sorted(os.listdir(root)) == ["pllava"]   # nothing was written beside the clone


def test_demo_checks_its_video_before_installing(tmp_path):
    clone = tmp_path / "pllava"
    subprocess.run(["git", "clone", "--quiet", "--local", str(REPO), str(clone)], check=True, timeout=120)
    done = subprocess.run(["bash", "scripts/demo.sh", "no-such-video.mp4"], cwd=clone,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "demo: no video at no-such-video.mp4" in done.stderr
    assert not (clone / ".venv").exists() and "bootstrap" not in done.stderr   # nothing was installed
