"""``pllava up``: N encoder servers and one decoder server as local processes, no Docker
(and, when asked, the OpenAI-compatible front end ``pllava-openai`` in front of the decoder).

The same topology as ``docker compose up --scale encoder=N``, on 127.0.0.1: each encoder
binds a free port (or ``encoder_port + i``) and reports it in its ``listening on HOST:PORT``
log line; the decoder gets all of them as one static gRPC target,
``ipv4:127.0.0.1:P1,127.0.0.1:P2,...``, over which it balances round robin exactly as over
``dns:///encoder:50051`` in compose.

    with launch("models/tiny", encoders=2, port=0) as cluster:
        print(cluster.address)              # the decoder, the one address a client needs
        cluster.encoders[0].logs()          # every line a server wrote, kept for inspection

``launch(..., metrics_port=BASE)`` serves the decoder's Prometheus metrics at BASE and encoder
i's at BASE+1+i; each server's ``metrics_url`` comes from its ``serving metrics on`` line.

Server settings reach the children as their ``PLLAVA_ENCODER_*`` / ``PLLAVA_DECODER_*``
environment variables (``launch(..., decoder_settings={"max_batch": 4})``), so every setting
a server has can be given, with the server's own checks and messages.

``launch(..., secure=DIR)`` (``pllava up --secure``) turns on everything
:mod:`pllava_serving.security` offers, on both hops, from the files of
:mod:`pllava_serving.certs` in DIR (made there first if DIR does not hold them): TLS with
client certificates required and a bearer token, on the decoder for clients and on the
encoders for the decoder. :meth:`Cluster.client_options` is what a client then needs.

Readiness is the servers' own gRPC health service (SERVING only after warm-up), and the front
end's ``GET /health`` (200 once the decoder answers). This module
lives with the serving code, not in the model package ``pllava``, which never imports grpc;
``pllava up`` imports it when it runs. While it runs, a server that exits is restarted on its
port with a back-off, the others untouched (:mod:`.supervisor`). Children run in their own
session (a terminal's Ctrl-C reaches only the launcher, which stops the decoder first so
in-flight captions finish, then the encoders) and, on Linux, get SIGTERM if the launcher dies
without stopping them. The front end's settings reach it the same way, as its
``PLLAVA_OPENAI_*`` environment variables.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Callable, Mapping, TextIO

import grpc

from pllava_client.health import check_health
from pllava_client.security import ClientTls

from .certs import DEFAULT_HOSTS, CertFiles, make_certs
from .console import write_line
from .parent_death import parent_death_env
from .supervisor import Supervisor, grpc_serving

#: ``pllava-encoder`` / ``pllava-decoder`` log this line once their port is bound.
LISTENING = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+)")
#: ... and this one once their metrics exporter is up (``metrics_port`` not 0).
METRICS = re.compile(r"serving metrics on http://(?P<host>\S+):(?P<port>\d+)/metrics")
DEFAULT_PORT = 50052
#: Lines of each server's output kept in memory for :meth:`ServerProcess.logs`.
MAX_LOG_LINES = 100_000
#: Seconds a server gets to finish in-flight calls after SIGTERM before it is killed.
DEFAULT_GRACE_S = 30.0


class LaunchError(RuntimeError):
    """A server did not come up; the message ends with the last lines it wrote."""


def default_model_dir() -> Path:
    """Where ``pllava up`` keeps the tiny random checkpoint it uses without ``--model``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pllava" / "tiny"


def ensure_tiny_model(path: str | Path | None = None) -> Path:
    """The tiny checkpoint at ``path`` (default :func:`default_model_dir`), made if absent.

    Written to a temporary sibling and renamed, so concurrent launchers never see half a
    checkpoint."""
    out = Path(path) if path is not None else default_model_dir()
    if (out / "config.json").exists():
        return out
    from pllava.tiny import make_tiny

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        make_tiny(tmp, seed=0)
        try:
            os.rename(tmp, out)
        except OSError:  # another launcher got there first, or an empty folder is in the way
            if not (out / "config.json").exists():
                if out.is_dir() and not any(out.iterdir()):
                    out.rmdir()
                    os.rename(tmp, out)
                else:
                    raise LaunchError(f"{out} holds files but no config.json: not a model folder; move it "
                                      "away (the tiny model is written there)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_certs_dir() -> Path:
    """Where ``pllava up --secure`` keeps its certificates and token without a folder named."""
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "pllava" / "certs"


def ensure_certs(folder: str | Path, decoder_host: str = "127.0.0.1") -> CertFiles:
    """The certificates and token in ``folder``, made there if it holds none (valid for this
    machine's names, ``decoder_host`` and the compose service names). FileExistsError when it
    holds only some of them."""
    certs = CertFiles(Path(folder))
    if certs.complete():
        return certs
    hosts = [*DEFAULT_HOSTS, socket.gethostname()]
    if decoder_host not in ("0.0.0.0", "::", ""):
        hosts.append(decoder_host)
    return make_certs(folder, hosts)


def secure_settings(certs: CertFiles) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(encoder, decoder, front-end settings) that turn on TLS, client certificates and the
    token on both hops with the files of ``certs``; the OpenAI front end reaches the decoder
    the same way and asks its own HTTP clients for the token."""
    server = {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key),
              "tls_client_ca": str(certs.ca), "auth_token_file": str(certs.token)}
    decoder = {**server, "encoder_tls_ca": str(certs.ca), "encoder_tls_cert": str(certs.client_cert),
               "encoder_tls_key": str(certs.client_key), "encoder_token_file": str(certs.token)}
    openai = {"auth_token_file": str(certs.token), "decoder_tls_ca": str(certs.ca),
              "decoder_tls_cert": str(certs.client_cert), "decoder_tls_key": str(certs.client_key),
              "decoder_token_file": str(certs.token)}
    return server, decoder, openai


def server_command(name: str) -> list[str]:
    """The argv prefix that runs console script ``name`` of this installation."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    raise LaunchError(f"{name} is not installed next to {sys.executable} nor on PATH; "
                      "install the project (pip install -e .)")


class ServerProcess:
    """One server child: its process, its address once bound, and every line it wrote.

    A thread reads the child's merged stdout/stderr, keeps the lines (:meth:`logs`), echoes
    them to ``echo`` prefixed with the server's name, and notes the ``listening on`` line.
    :meth:`restart` starts the same command again on the port the server first bound (also
    after a restart that failed before binding), so whoever knows its address (the decoder, for
    an encoder; clients, for the decoder) reaches the new process there.
    """

    def __init__(self, name: str, argv: list[str], *, echo: TextIO | None = None,
                 env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.address: str | None = None
        self._port: str | None = None  # the port first bound: every restart binds it again
        self.metrics_url: str | None = None  # http://HOST:PORT/metrics once the server reports it
        self._metrics_seen = threading.Event()
        self.restarts = 0
        self._lines: deque[str] = deque(maxlen=MAX_LOG_LINES)
        self._lock = threading.Lock()
        self._echo = echo
        self._bound = threading.Event()
        self._env = dict(os.environ if env is None else env)
        self._env.setdefault("PYTHONUNBUFFERED", "1")
        self._start(argv)

    def _start(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**self._env, **parent_death_env(signal.SIGTERM)}, text=True, errors="replace", bufsize=1,
            start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(self.process,), name=f"{self.name}-log",
                                        daemon=True)
        self._reader.start()

    def restart(self) -> None:
        """Start the server again (after it exited) on the port it had bound."""
        if self.alive():
            raise RuntimeError(f"{self.name} is still running")
        self._reader.join(5)
        argv = list(self.argv) if self._port is None else _with_port(self.argv, self._port)
        self.address = None
        self._bound.clear()
        self.restarts += 1
        self._start(argv)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            line = line.rstrip("\n")
            with self._lock:
                self._lines.append(line)
            if self.address is None:
                m = LISTENING.search(line)
                if m:
                    self.address = f"{_reachable(m['host'])}:{m['port']}"
                    self._port = self._port or m["port"]
                    self._bound.set()
            if self.metrics_url is None:
                m = METRICS.search(line)
                if m:
                    self.metrics_url = f"http://{_reachable(m['host'])}:{m['port']}/metrics"
                    self._metrics_seen.set()
            if self._echo is not None:
                try:
                    write_line(self._echo, f"{self.name} | {line}")
                except (OSError, ValueError):  # the echo stream went away
                    self._echo = None
        if process is self.process:  # not an earlier run's reader finishing late
            self._bound.set()  # end of output: wake waiters, who then see the exit
            self._metrics_seen.set()

    def logs(self) -> list[str]:
        """The lines the server has written so far (the last MAX_LOG_LINES)."""
        with self._lock:
            return list(self._lines)

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.logs()[-n:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_bound(self, timeout: float) -> str:
        """Wait for the ``listening on`` line; return the server's address."""
        self._bound.wait(timeout)
        if self.address is None:
            if not self._reader.is_alive():  # its output ended: it is exiting or has exited
                self.wait(10)
            what = (f"exited with status {self.process.poll()}" if not self.alive()
                    else f"did not report 'listening on HOST:PORT' within {timeout:g} s")
            raise LaunchError(f"{self.name} {what}; its last lines:\n{self.tail()}")
        return self.address

    def wait_metrics(self, timeout: float) -> str:
        """Wait for the ``serving metrics on`` line; return the metrics URL."""
        self._metrics_seen.wait(timeout)
        if self.metrics_url is None:
            raise LaunchError(f"{self.name} did not report 'serving metrics on http://HOST:PORT/metrics' "
                              f"within {timeout:g} s; its last lines:\n{self.tail()}")
        return self.metrics_url

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit; its status, or None if ``timeout`` passed."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(5)
        return code


def _reachable(host: str) -> str:
    """The host to connect to for a server bound to ``host`` (a wildcard is reached on loopback),
    an IPv6 address in brackets (``[::1]``, as gRPC targets and URLs need)."""
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", "*", "localhost", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def stop_all(servers: list[ServerProcess], grace: float = DEFAULT_GRACE_S) -> None:
    """SIGTERM ``servers`` together, wait up to ``grace`` seconds, SIGKILL whoever is left."""
    for server in servers:
        server.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for server in servers:
        if server.wait(max(0.0, deadline - time.monotonic())) is None:
            server.signal(signal.SIGKILL)
            server.wait()


def _with_port(argv: list[str], port: str) -> list[str]:
    """``argv`` with its ``--port`` value (the last one given) replaced, or ``--port`` added."""
    out = list(argv)
    at = max((i for i, a in enumerate(out[:-1]) if a == "--port"), default=None)
    if at is None:
        return out + ["--port", port]
    out[at + 1] = port
    return out


class Cluster:
    """Handles on the servers :func:`launch` started; a context manager that stops them."""

    def __init__(self, encoders: list[ServerProcess], decoder: ServerProcess | None,
                 openai: ServerProcess | None = None, certs: CertFiles | None = None):
        self.encoders = encoders
        self.decoder = decoder
        self.openai = openai
        self.certs = certs  # the TLS files and token of a secured cluster

    @property
    def address(self) -> str:
        """The decoder's address, the one a client needs."""
        return self.decoder.address

    def client_options(self) -> dict[str, str]:
        """Keyword arguments of ``pllava_client.Client`` for this cluster: ``{}``, or the CA,
        client certificate, key and token of a secured one."""
        if self.certs is None:
            return {}
        return dict(tls_ca=str(self.certs.ca), tls_cert=str(self.certs.client_cert),
                    tls_key=str(self.certs.client_key), token=self.certs.token.read_text().split()[0])

    def client_tls(self) -> ClientTls | None:
        """What a health check needs to reach these servers."""
        if self.certs is None:
            return None
        return ClientTls.from_files(str(self.certs.ca), str(self.certs.client_cert), str(self.certs.client_key))

    @property
    def openai_url(self) -> str | None:
        """The base URL of the OpenAI-compatible API (``http://HOST:PORT/v1``), if started."""
        return f"http://{self.openai.address}/v1" if self.openai is not None else None

    @property
    def servers(self) -> list[ServerProcess]:
        return ([self.openai] if self.openai else []) + ([self.decoder] if self.decoder else []) + self.encoders

    def exited(self) -> ServerProcess | None:
        """A server that is no longer running, if any."""
        return next((s for s in self.servers if not s.alive()), None)

    def stop(self, grace: float = DEFAULT_GRACE_S) -> None:
        """Stop the front end and the decoder first (in-flight captions finish), then the encoders."""
        if self.openai is not None:
            stop_all([self.openai], grace)
        if self.decoder is not None:
            stop_all([self.decoder], grace)
        stop_all(self.encoders, grace)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_healthy(servers: list[ServerProcess], timeout: float, tls: ClientTls | None = None) -> None:
    """Return once every server's health service answers SERVING; LaunchError if one exits
    first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while waiting:
        for server in waiting:
            if not server.alive():
                raise LaunchError(f"{server.name} exited with status {server.process.poll()} "
                                  f"before it was ready; its last lines:\n{server.tail()}")
        server = waiting[0]
        try:
            serving = check_health(server.address, timeout=1.0, tls=tls) == "SERVING"
        except grpc.RpcError:  # not answering yet
            serving = False
        if serving:
            waiting.pop(0)
            continue
        if time.monotonic() > deadline:
            names = ", ".join(s.name for s in waiting)
            raise LaunchError(f"{names} not SERVING within {timeout:g} s; the last lines of "
                              f"{server.name}:\n{server.tail()}")
        time.sleep(0.2)


def _wait_http_ready(server: ServerProcess, timeout: float) -> None:
    """Return once ``GET /health`` of the front end ``server`` answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive():
            raise LaunchError(f"{server.name} exited with status {server.process.poll()} before it was ready; "
                              f"its last lines:\n{server.tail()}")
        try:
            with urllib.request.urlopen(f"http://{server.address}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):  # 503 (HTTPError) or not answering yet
            pass
        if time.monotonic() > deadline:
            raise LaunchError(f"{server.name} did not answer /health with 200 within {timeout:g} s; its last "
                              f"lines:\n{server.tail()}")
        time.sleep(0.2)


def _readiness(cluster: Cluster) -> Callable[[ServerProcess], bool]:
    """Whether a server of ``cluster`` serves now: the front end's ``/health`` answers 200, a
    gRPC server's health service SERVING (over the cluster's TLS when it is secured)."""
    tls = cluster.client_tls()

    def serving(server: ServerProcess) -> bool:
        if server.name != "openai":
            return grpc_serving(server, tls)
        try:
            with urllib.request.urlopen(f"http://{server.address}/health", timeout=0.5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return serving


def settings_env(prefix: str, settings: Mapping[str, object] | None) -> dict[str, str]:
    """``{"max_batch": 4}`` -> ``{"PLLAVA_DECODER_MAX_BATCH": "4"}`` (``prefix`` "PLLAVA_DECODER_");
    the server parses and checks the values (booleans as true/false, None as none, lists
    comma-separated)."""
    env = {}
    for name, value in (settings or {}).items():
        key = name.strip().replace("-", "_")
        if not key.isidentifier():
            raise ValueError(f"{name!r} is not a setting name")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            text = "none"
        elif isinstance(value, (list, tuple)):
            text = ",".join(map(str, value))
        else:
            text = str(value)
        env[prefix + key.upper()] = text
    return env


def parse_setting(text: str) -> tuple[str, str]:
    """``"max_batch=4"`` -> ``("max_batch", "4")`` (``--decoder-setting`` values)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    return name.strip().replace("-", "_"), value


def launch(model: str | Path | None = None, *, encoders: int = 1, port: int = DEFAULT_PORT,
           host: str = "127.0.0.1", encoder_port: int = 0, device: str | None = None,
           dtype: str | None = None, ready_timeout: float = 600.0,
           echo: TextIO | None = sys.stderr, env: dict[str, str] | None = None,
           encoder_settings: Mapping[str, object] | None = None,
           decoder_settings: Mapping[str, object] | None = None, openai_port: int | None = None,
           openai_settings: Mapping[str, object] | None = None, metrics_port: int = 0,
           secure: str | Path | None = None) -> Cluster:
    """Start ``encoders`` encoder servers and one decoder server; return once all are SERVING.

    ``model`` None uses the tiny random checkpoint (:func:`ensure_tiny_model`). The decoder
    listens on ``host:port`` (``port`` 0: any free port, see ``Cluster.address``); encoders on
    127.0.0.1, at ``encoder_port + i`` or, with 0, at free ports. ``device`` and ``dtype``
    are passed to every server when given; ``encoder_settings`` / ``decoder_settings`` (field
    names of the servers' settings, e.g. ``{"max_batch": 4, "visual_cache_bytes": 0}``) to
    each encoder / the decoder, through their environment, over ``env`` (default: this
    process's environment). ``openai_port`` (None: none) also starts ``pllava-openai`` on
    ``host:openai_port`` (0: any free port, see ``Cluster.openai_url``) in front of the decoder,
    ready once its ``/health`` answers 200; ``openai_settings`` reach it as ``PLLAVA_OPENAI_*``.
    ``metrics_port`` (0 = off) serves the decoder's Prometheus metrics at that port on
    ``host`` and encoder ``i``'s at ``metrics_port + 1 + i`` on 127.0.0.1 (each server's
    ``metrics_url``). Children's output is echoed to ``echo`` (None: kept only). On failure
    -- a bad setting included, which the server names -- every started child is stopped and
    :class:`LaunchError` raised.

    ``secure`` (a folder): TLS with client certificates and a bearer token on both hops,
    from the files in the folder, made there when it holds none (:func:`ensure_certs`); the
    front end, if started, reaches the decoder that way and requires the token as its API
    key. ``*_settings`` still override single settings.
    """
    if encoders < 1:
        raise ValueError(f"at least one encoder is needed, got {encoders}")
    check_metrics_ports(metrics_port, encoders, port, encoder_port, openai_port)
    flagged = {"device": device is not None, "dtype": dtype is not None, "metrics_port": bool(metrics_port)}
    for what, given, own in (("encoder", encoder_settings, ENCODER_OWN), ("decoder", decoder_settings, DECODER_OWN),
                             ("openai", openai_settings, OPENAI_OWN)):
        names = {str(name).replace("-", "_") for name in (given or {})}
        taken = sorted(name for name in names & set(own) if flagged.get(name, True))
        if taken:  # the command line the launcher gives the server would win over them, unseen
            raise ValueError(f"--{what}-setting {', '.join(taken)}: set by pllava up itself; use "
                             + ", ".join(own[name] for name in taken))
    model_dir = Path(model) if model is not None else ensure_tiny_model()
    if not model_dir.exists():
        raise FileNotFoundError(f"model {model_dir} does not exist")
    common = ["--model", str(model_dir)]
    if device is not None:
        common += ["--device", device]
    if dtype is not None:
        common += ["--dtype", dtype]
    certs = ensure_certs(secure, host) if secure is not None else None
    if certs is not None:
        secure_encoder, secure_decoder, secure_openai = secure_settings(certs)
        encoder_settings = {**secure_encoder, **(encoder_settings or {})}
        decoder_settings = {**secure_decoder, **(decoder_settings or {})}
        openai_settings = {**secure_openai, **(openai_settings or {})}
    base_env = dict(os.environ if env is None else env)
    encoder_env = {**base_env, **settings_env("PLLAVA_ENCODER_", encoder_settings)}
    decoder_env = {**base_env, **settings_env("PLLAVA_DECODER_", decoder_settings)}
    if metrics_port:
        decoder_env["PLLAVA_DECODER_METRICS_PORT"] = str(metrics_port)

    cluster = Cluster([], None, certs=certs)
    try:
        encoder_cmd = server_command("pllava-encoder")
        for i in range(encoders):
            p = encoder_port + i if encoder_port else 0
            env_i = dict(encoder_env)
            if metrics_port:
                env_i["PLLAVA_ENCODER_METRICS_PORT"] = str(metrics_port + 1 + i)
            cluster.encoders.append(ServerProcess(
                f"encoder-{i}", encoder_cmd + common + ["--host", "127.0.0.1", "--port", str(p)],
                echo=echo, env=env_i))
        deadline = time.monotonic() + ready_timeout
        addresses = [e.wait_bound(max(1.0, deadline - time.monotonic())) for e in cluster.encoders]
        target = "ipv4:" + ",".join(addresses)
        cluster.decoder = ServerProcess(
            "decoder", server_command("pllava-decoder") + common
            + ["--host", host, "--port", str(port), "--encoder", target], echo=echo, env=decoder_env)
        cluster.decoder.wait_bound(max(1.0, deadline - time.monotonic()))
        _wait_healthy(cluster.encoders + [cluster.decoder], max(1.0, deadline - time.monotonic()),
                      cluster.client_tls())
        if metrics_port:  # logged before warm-up, so already read
            for server in [cluster.decoder] + cluster.encoders:
                server.wait_metrics(10.0)
        if openai_port is not None:
            cluster.openai = ServerProcess(
                "openai", server_command("pllava-openai")
                + ["--decoder", cluster.address, "--host", host, "--port", str(openai_port)],
                echo=echo, env={**base_env, **settings_env("PLLAVA_OPENAI_", openai_settings)})
            cluster.openai.wait_bound(max(1.0, deadline - time.monotonic()))
            _wait_http_ready(cluster.openai, max(1.0, deadline - time.monotonic()))
    except BaseException:
        cluster.stop(grace=5.0)
        raise
    return cluster


#: Settings the launcher gives each server itself (as flags, which beat ``--*-setting``; device,
#: dtype and metrics_port only where ``pllava up`` was given them), and what sets each instead.
ENCODER_OWN = {"model": "--model", "host": "(encoders listen on 127.0.0.1)", "port": "--encoder-port",
               "device": "--device", "dtype": "--dtype", "metrics_port": "--metrics-port"}
DECODER_OWN = {"model": "--model", "host": "--host", "port": "--port", "encoder": "--encoders",
               "device": "--device", "dtype": "--dtype", "metrics_port": "--metrics-port"}
OPENAI_OWN = {"decoder": "(the front end reaches the decoder pllava up starts)", "host": "--host",
              "port": "--openai-port"}


def check_metrics_ports(metrics_port: int, encoders: int, port: int, encoder_port: int,
                        openai_port: int | None = None) -> None:
    """ValueError unless ``metrics_port .. metrics_port + encoders`` are valid ports that no
    gRPC port of the launch, nor the OpenAI-compatible API's, uses."""
    if not metrics_port:
        return
    last = metrics_port + encoders
    if metrics_port < 0 or last > 65535:
        raise ValueError(f"--metrics-port {metrics_port} with {encoders} encoder(s) needs ports "
                         f"{metrics_port}..{last}, which must lie in 1..65535")
    grpc_ports = {port} | {encoder_port + i for i in range(encoders) if encoder_port}
    clash = sorted(p for p in grpc_ports if p and metrics_port <= p <= last)
    if clash:
        raise ValueError(f"--metrics-port {metrics_port} with {encoders} encoder(s) uses ports "
                         f"{metrics_port}..{last}, which include the gRPC port(s) {', '.join(map(str, clash))}; "
                         "pick a metrics port outside them")
    if openai_port and metrics_port <= openai_port <= last:
        raise ValueError(f"--metrics-port {metrics_port} with {encoders} encoder(s) uses ports "
                         f"{metrics_port}..{last}, which include the OpenAI-compatible API's port "
                         f"{openai_port}; pick a metrics port outside them")


def run_foreground(cluster: Cluster, out: TextIO = sys.stdout,
                   grace: float = DEFAULT_GRACE_S, restart: bool = True) -> int:
    """Block until SIGINT/SIGTERM, then stop the servers (exit 0). A server that exits
    meanwhile is started again on its port (:mod:`.supervisor`); with ``restart=False`` its
    exit stops the others instead (exit 1)."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    supervisor = Supervisor(cluster.servers, ready=_readiness(cluster)) if restart else None
    try:
        died = None
        while not stop.wait(0.5):
            if supervisor is not None:
                supervisor.tick()
                continue
            died = cluster.exited()
            if died is not None:
                break
        try:
            if died is not None:
                write_line(sys.stderr, f"pllava up: {died.name} exited with status {died.process.poll()}; "
                                       f"stopping the others. Its last lines:\n{died.tail()}")
            else:
                write_line(out, f"pllava up: {signal.Signals(received[0]).name}, stopping the servers")
        except (OSError, ValueError):  # the output went away (a pipe whose reader Ctrl-C ended too)
            pass
        return 1 if died is not None else 0
    finally:  # every way out, a failed restart included, stops the servers in order
        cluster.stop(grace)
        for s, handler in previous.items():
            signal.signal(s, handler)
