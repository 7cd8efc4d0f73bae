"""Test helper (not a test module): run PLLaVA servers as real subprocesses on 127.0.0.1.

    with start_encoder(tiny_model_dir, log_dir=tmp_path) as server:
        channel = grpc.insecure_channel(server.address, options=channel_options())
        ...

:func:`start_server` runs any server command that logs ``listening on HOST:PORT`` (both
``pllava-encoder`` and ``pllava-decoder`` do) and uses the standard health service: it
starts the process with ``--port 0`` so the OS picks a free port, reads the bound port from
the log line, and waits until health answers SERVING. All output goes to a log file whose
tail is shown when a start fails; :meth:`ServerProcess.log_text` reads it for assertions.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from pllava_client.health import wait_until_serving
from pllava_client.security import ClientTls

LISTENING = re.compile(r"listening on (\S+):(\d+)\s*$", re.MULTILINE)


def console_script(name: str) -> str:
    """The path of an installed console script, preferring the running interpreter's venv."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"console script {name!r} is not installed (pip install -e .)")
    return found


class ServerProcess:
    """A running server subprocess: its address, its log, and ways to end it."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, host: str, port: int):
        self.proc = proc
        self.log_path = log_path
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait until the log matches the regex ``pattern``; return the match."""
        return _wait_for_log(self.proc, self.log_path, re.compile(pattern, re.MULTILINE), timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit; return its exit status."""
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit (killing it after ``timeout``); the exit status."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its video workers too), as when a
        container dies: each server runs in its own process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_for_log(proc: subprocess.Popen, log_path: Path, pattern: re.Pattern, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        match = pattern.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before logging "
                               f"{pattern.pattern!r}; log {log_path}:\n{_tail(text)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern.pattern!r} in the server log within {timeout:g} s; "
                               f"log {log_path}:\n{_tail(text)}")
        time.sleep(0.05)


def _wait_serving(server: ServerProcess, timeout: float, tls: ClientTls | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not wait_until_serving(server.address, timeout=1.0, tls=tls):
        if not server.alive():
            raise RuntimeError(f"server exited with status {server.proc.returncode} before SERVING; "
                               f"log {server.log_path}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"server at {server.address} did not report SERVING within {timeout:g} s; "
                               f"log {server.log_path}:\n{server.log_tail()}")


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def start_server(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 log_dir: str | os.PathLike | None = None, name: str | None = None,
                 wait_serving: bool = True, timeout: float = 180.0,
                 tls: ClientTls | None = None) -> ServerProcess:
    """Start ``argv`` (a command that binds the port it is given and logs ``listening on
    HOST:PORT``), find its port, and (``wait_serving``) wait for health SERVING, over TLS
    with ``tls`` (a server started with ``--tls-cert``).

    ``env`` entries are added to this process's environment. The log goes to
    ``log_dir/<name>-<n>.log`` (a fresh temporary folder when ``log_dir`` is None).
    """
    name = name or Path(argv[0]).name
    folder = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="pllava-servers-"))
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    while (folder / f"{name}-{index}.log").exists():
        index += 1
    log_path = folder / f"{name}-{index}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        match = _wait_for_log(proc, log_path, LISTENING, timeout)
        host = match.group(1).strip("[]")
        server = ServerProcess(proc, log_path, host if host not in ("0.0.0.0", "::") else "127.0.0.1",
                               int(match.group(2)))
        if wait_serving:
            _wait_serving(server, timeout, tls)
    except BaseException:
        ServerProcess(proc, log_path, "", 0).kill()
        raise
    return server


def start_encoder(model_dir: str | os.PathLike, port: int = 0, extra_args: Sequence[str] = (),
                  env: Mapping[str, str] | None = None, **kwargs) -> ServerProcess:
    """``pllava-encoder --model MODEL_DIR --host 127.0.0.1 --port PORT EXTRA_ARGS...``"""
    argv = [console_script("pllava-encoder"), "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), *extra_args]
    return start_server(argv, env=env, name="encoder", **kwargs)


def start_decoder(model_dir: str | os.PathLike, encoder_target: str, log_dir: str | os.PathLike | None,
                  *args: str, **kwargs) -> "ServerProcess":
    """A ``pllava-decoder`` on a free loopback port talking to ``encoder_target``; extra
    flags in ``args``, :func:`start_server`'s options (``env``, ``tls``, ...) in ``kwargs``."""
    argv = [console_script("pllava-decoder"), "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
            "--encoder", encoder_target, *args]
    return start_server(argv, name="decoder", log_dir=log_dir, **kwargs)


def start_openai(decoder_address: str, log_dir: str | os.PathLike | None, *args: str,
                 wait_ready: bool = True, timeout: float = 120.0) -> ServerProcess:
    """A ``pllava-openai`` front end on a free loopback port in front of ``decoder_address``;
    extra flags in ``args``. ``wait_ready``: until ``GET /health`` answers 200 (the decoder
    serving)."""
    argv = [console_script("pllava-openai"), "--decoder", decoder_address, "--host", "127.0.0.1", "--port", "0",
            *args]
    server = start_server(argv, name="openai", log_dir=log_dir, wait_serving=False, timeout=timeout)
    if wait_ready:
        deadline = time.monotonic() + timeout
        while http_status(f"http://{server.address}/health") != 200:
            if not server.alive() or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the front end at {server.address} did not answer /health with 200 within "
                                   f"{timeout:g} s; log {server.log_path}:\n{server.log_tail()}")
            time.sleep(0.2)
    return server


def http_status(url: str, timeout: float = 10.0) -> int | None:
    """The HTTP status of ``GET url`` (None when nothing answers)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None
