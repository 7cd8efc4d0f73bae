"""``pllava-openai``: the OpenAI-compatible front end as a process (FastAPI on uvicorn).

    pllava-openai --decoder 127.0.0.1:50052 [--host 127.0.0.1 --port 8000] [--config openai.yaml]

Settings: defaults < ``--config`` YAML < ``PLLAVA_OPENAI_*`` environment < flags. The port is
bound here, before uvicorn starts, so port 0 works and the ``listening on HOST:PORT`` line the
other servers write is written here too. SIGTERM lets running requests finish for up to
``grace_s`` seconds, then exits 0.
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

import uvicorn

from pllava_serving.logs import LOG_LEVELS
from pllava_serving.server import format_address, settings_from_command_line

from .app import create_app
from .settings import DEFAULT_MAX_MEDIA_BYTES, ENV_PREFIX, OpenAISettings

log = logging.getLogger("pllava_openai")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pllava-openai",
        description="OpenAI-compatible HTTP API (POST /v1/chat/completions with a video_url part) in front of a "
                    "PLLaVA decoder. Settings: defaults < --config YAML < PLLAVA_OPENAI_* environment < flags.")
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (keys are the field names)")
    p.add_argument("--decoder", metavar="TARGET",
                   help="gRPC target of the decoder (default 127.0.0.1:50052; e.g. dns:///decoder:50052)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000; 0 = any free port)")
    p.add_argument("--model-name", help="the model id clients name and /v1/models lists (default: the decoder's "
                                        "model id)")
    p.add_argument("--auth-token-file", metavar="FILE",
                   help="accepted API keys, one a line; requests must send 'Authorization: Bearer <key>' "
                        "(default: no key needed)")
    p.add_argument("--allowed-media-root", metavar="DIR",
                   help="allow file:// URLs and paths of files under DIR (default: off, data: URLs only)")
    p.add_argument("--allow-remote-media", action=argparse.BooleanOptionalAction, default=None,
                   help="download http(s) media URLs, from public addresses only (default: off)")
    p.add_argument("--allow-private-media-hosts", action=argparse.BooleanOptionalAction, default=None,
                   help="let downloads reach loopback, private and link-local addresses too (cloud "
                        "metadata services, internal hosts: only where every client is trusted; default: off)")
    p.add_argument("--max-media-bytes", type=int,
                   help=f"largest video or image of a request (default {DEFAULT_MAX_MEDIA_BYTES})")
    p.add_argument("--download-timeout-s", type=float, help="one http(s) media download (default 30)")
    p.add_argument("--body-timeout-s", type=float,
                   help="a request body must arrive within this, 408 past it (default 120)")
    p.add_argument("--caption-timeout-s", type=float, help="deadline of one caption (default: none)")
    p.add_argument("--max-concurrent-requests", type=int,
                   help="captions in flight before 429 (default 64)")
    p.add_argument("--max-body-bytes-in-flight", type=int,
                   help="request body bytes of the captions in flight before 429; a lone request always "
                        "fits (default 512 MiB)")
    p.add_argument("--grace-s", type=float, help="on SIGTERM, seconds running requests get to finish (default 10)")
    p.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, help="default INFO")
    d = p.add_argument_group("TLS and tokens towards the decoder")
    d.add_argument("--decoder-tls-ca", metavar="FILE",
                   help="reach the decoder over TLS, trusting this CA (default: plaintext)")
    d.add_argument("--decoder-tls-cert", metavar="FILE",
                   help="client certificate for a decoder that requires one (with --decoder-tls-key)")
    d.add_argument("--decoder-tls-key", metavar="FILE", help="the PEM private key of --decoder-tls-cert")
    d.add_argument("--decoder-token-file", metavar="FILE",
                   help="send the first token in this file to the decoder (read again when it changes)")
    return p


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket at ``host:port`` (port 0: a free one); OSError if taken."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over TIME_WAIT, not share
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_command_line("pllava-openai", build_parser(), OpenAISettings, ENV_PREFIX, argv)
    if settings is None:
        return 2
    try:
        app = create_app(settings)
    except ValueError as exc:  # an unreadable or empty token file, unusable TLS files
        log.error("pllava-openai failed: %s", exc)
        return 2
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        log.error("pllava-openai failed: cannot listen on %s: %s",
                  format_address(settings.host, settings.port), exc)
        return 1
    log.info("decoder at %s", settings.decoder)
    log.info("listening on %s", format_address(settings.host, sock.getsockname()[1]))
    config = uvicorn.Config(app, log_config=None, log_level=settings.log_level.lower(), lifespan="on",
                            timeout_graceful_shutdown=settings.grace_s, server_header=False)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: exit 0 then.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
