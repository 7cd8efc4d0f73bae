"""The client package installs and captions where MindSpore is absent.

A fresh virtual environment (no system site-packages) gets only ``pip install client/``:
grpcio, protobuf, numpy, grpcio-health-checking and tqdm from the package index. MindSpore and
the ``pllava`` package must not import there, and that environment's ``pllava-caption`` and
``Client`` caption a video, and a collection, through real encoder and decoder servers.

Why a real venv rather than an import hook that hides MindSpore: it is what a user does,
it also checks client/pyproject.toml (packages, dependencies, the console script), and it is
cheap -- measured at about 10 s on this project's CI machine, the dependencies being
wheels.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pllava_client import Client
from servers import console_script, start_encoder, start_server

CLIENT_DIR = Path(__file__).resolve().parents[1] / "client"


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client-venv")
    source = root / "src"
    # A copy, so the build's egg-info and build/ folders stay out of the source tree.
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def run_in(venv: Path, *argv, **kwargs) -> subprocess.CompletedProcess:
    # cwd outside the repository, so nothing importable lies in the current directory
    return subprocess.run([str(venv / "bin" / argv[0]), *map(str, argv[1:])], capture_output=True,
                          text=True, timeout=180, cwd=venv, **kwargs)


def test_mindspore_and_pllava_are_absent(client_venv):
    for module in ("mindspore", "pllava", "pllava_serving", "torch"):
        done = run_in(client_venv, "python", "-c", f"import {module}")
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, (module, done.stderr)
    listed = run_in(client_venv, "python", "-m", "pip", "list", "--format", "json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"pllava-client", "grpcio", "protobuf", "numpy", "grpcio-health-checking", "tqdm"} <= names
    assert "mindspore" not in names and "pllava-serve" not in names


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("no-mindspore-servers")
    with start_encoder(tiny_model_dir, log_dir=logs) as encoder:
        argv = [console_script("pllava-decoder"), "--model", str(tiny_model_dir), "--host",
                "127.0.0.1", "--port", "0", "--encoder", encoder.address]
        with start_server(argv, name="decoder", log_dir=logs) as decoder:
            yield decoder.address


def test_caption_from_the_venv_without_mindspore(client_venv, stack, videos_dir):
    video = videos_dir / "orbit.mp4"
    with Client(stack, timeout=120) as client:   # the project's own client, for reference
        expected = client.caption_full(video, max_new_tokens=12)

    done = run_in(client_venv, "pllava-caption", video, "--server", stack, "--max-new-tokens", 12,
                  "--json", "--timeout", 120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == expected.token_ids

    script = (
        "import sys\n"
        "from pllava_client import Client\n"
        f"stream = Client({stack!r}, timeout=120).caption({str(video)!r}, max_new_tokens=12)\n"
        "text = ''.join(stream)\n"
        "assert text == stream.result.caption, (text, stream.result.caption)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mindspore', 'pllava'))\n"
        "assert not loaded, loaded\n"
        "print(stream.token_ids)\n")
    done = run_in(client_venv, "python", "-c", script)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected.token_ids


def test_a_collection_from_the_venv_without_mindspore(client_venv, stack, videos_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    done = run_in(client_venv, "pllava-caption", videos_dir, "--out", out, "--server", stack,
                  "--max-new-tokens", 3, "--concurrency", 2)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    media = sorted(p.name for p in videos_dir.iterdir() if p.suffix in (".mp4", ".jpg"))
    assert sorted(Path(line["path"]).name for line in lines) == media
    assert all(line["status"] == "ok" and line["num_generated_tokens"] == 3 for line in lines)
