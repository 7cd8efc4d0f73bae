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
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

from prometheus_client.parser import text_string_to_metric_families

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


def wait_until(condition, timeout: float = 60.0, what: str = "timed out") -> None:
    """Poll ``condition()`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


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


def live_processes(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``. A server started
    here leads its own group, so its pid is the group of everything it started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def free_ports(count: int) -> int:
    """A port P such that P .. P+count-1 are free on 127.0.0.1 now."""
    import random
    import socket

    for _ in range(200):
        first = random.randint(20000, 60000 - count)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"found no {count} consecutive free ports")


class PllavaUp:
    """``pllava up`` as a subprocess: its output lines (each server's prefixed with its name),
    the decoder and encoder addresses from its ready line, and the pids of its servers.

        with PllavaUp(model, "--encoders", 2, "--port", 0) as up:
            up.wait_ready()
            up.server_pid("encoder-0"); up.wait_for(r"encoder-0 is SERVING again")
    """

    READY = re.compile(r"^pllava up: decoder at (\S+) \(\d+ encoder\(s\) at (.*)\);")

    def __init__(self, model_dir: str | os.PathLike, *args, env: Mapping[str, str] | None = None):
        import threading

        self.proc = subprocess.Popen([sys.executable, "-m", "pllava.cli", "up", "--model", str(model_dir),
                                      *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace",
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address: str | None = None
        self.encoders: list[str] = []

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def text(self, server: str | None = None, since: int = 0) -> str:
        """Every line so far (from line ``since``), or only those of ``server`` ("decoder", "encoder-0")."""
        with self._lock:
            lines = self.lines[since:]
        if server is not None:
            prefix = f"{server} | "
            lines = [line[len(prefix):] for line in lines if line.startswith(prefix)]
        return "\n".join(lines)

    def mark(self) -> int:
        """The number of lines so far: pass as ``since`` to look only at later ones."""
        with self._lock:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120.0, since: int = 0) -> re.Match:
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text(since=since))
            if match:
                return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise RuntimeError(f"pllava up exited ({self.proc.returncode}) before {pattern!r}:\n"
                                   + self.text()[-4000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} from pllava up within {timeout:g} s:\n" + self.text()[-4000:])
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 600.0) -> "PllavaUp":
        match = self.wait_for(self.READY.pattern, timeout)
        self.address, self.encoders = match.group(1), match.group(2).split(", ")
        return self

    def server_pid(self, name: str) -> int:
        """Pid of the running server ``name`` ("decoder" or "encoder-N", started with
        ``--encoder-port`` so that each encoder's command line names its port)."""
        if name == "decoder":
            want = ["pllava-decoder"]
        else:
            port = self.encoders[int(name.rsplit("-", 1)[1])].rpartition(":")[2]
            want = ["pllava-encoder", f"--port {port}"]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) == self.proc.pid and all(w in cmdline for w in want):
                return int(entry.name)
        raise LookupError(f"no running {name} under pllava up:\n{self.text()[-3000:]}")

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        self._reader.join(10)
        return code

    def __enter__(self) -> "PllavaUp":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def scrape(url: str) -> dict:
    """``{(sample name, frozenset(labels)): value}`` and ``{family name: family}`` of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    return {"families": families, "samples": samples}


def value(snapshot: dict, name: str, **labels) -> float:
    return snapshot["samples"].get((name, frozenset(labels.items())), 0.0)
