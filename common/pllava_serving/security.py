"""The server side of TLS and bearer tokens, shared by both servers.

    security = ServerSecurity.from_settings(settings)     # files read and checked here
    server, port, state = await create_server(address, services, security=security)

TLS: ``tls_cert`` + ``tls_key`` serve TLS; ``tls_client_ca`` also requires every client to
present a certificate signed by that CA (mutual TLS). The three files are read again when
they change (checked at most once a second, on new connections), so a renewed certificate
(cert-manager, a cron job) is picked up without a restart; a renewal that does not load
(a key that does not match its certificate, a half-written file) is logged and the previous
files stay in use.

Tokens: ``auth_token_file`` holds the accepted bearer tokens, one a line (blank lines and
``#`` comments ignored). Every RPC must carry ``authorization: Bearer TOKEN`` metadata,
except the standard health service, which load balancers, Docker and Kubernetes probes call
without credentials. Server reflection needs the token: it is for people with grpcurl
(``-H 'authorization: Bearer TOKEN'``), and it describes every method to whoever asks. The
presented token is compared with every accepted one in constant time (SHA-256 digests
compared with :func:`hmac.compare_digest`, all of them, whatever matches), so neither the
time taken nor its length tells a caller how close it came. The file is read again when it
changes, so tokens are rotated by adding the new one, moving clients over, and removing the
old one, without a restart.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import grpc

from pllava_client.security import AUTHORIZATION, BEARER, read_pem, unreadable

from .errors import display_name

log = logging.getLogger(__name__)

#: Methods answered without a token: the health service (its full name's prefix).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
#: Files are checked for changes at most this often (seconds).
RELOAD_CHECK_S = 1.0
#: Tokens shorter than this are accepted but logged as weak.
MIN_STRONG_TOKEN_CHARS = 16


class _WatchedFiles:
    """Notices when any of some files changes (checked at most every ``RELOAD_CHECK_S``)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = [p for p in paths if p]
        self._stamp = self._stamps()
        self._checked = time.monotonic()

    def _stamps(self) -> tuple:
        stamps = []
        for path in self.paths:
            try:
                st = os.stat(path)  # follows symlinks: a Kubernetes secret swaps its link
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def changed(self) -> bool:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return False
        self._checked = now
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True


# ---- tokens ------------------------------------------------------------------------------------

def read_tokens(path: str, what: str = "auth_token_file") -> list[str]:
    """The tokens in ``path``, one a line; ValueError naming the file and line for a problem."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ValueError(unreadable(what, path, exc)) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: cannot be read ({exc})") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not all(33 <= ord(ch) <= 126 for ch in token):
            raise ValueError(f"{what} {path}, line {number}: a token must be printable ASCII without spaces")
        tokens.append(token)
    if not tokens:
        raise ValueError(f"{what} {path}: holds no token (one token a line; blank lines and # comments "
                         "are ignored)")
    return tokens


class TokenFile:
    """The tokens of a file, read again when it changes. A change that does not read (an
    empty or half-written file) is logged and the previous tokens stay."""

    def __init__(self, path: str, what: str = "auth_token_file"):
        self.path = path
        self.what = what
        self._lock = threading.Lock()
        self._watch = _WatchedFiles([path])
        self._tokens = read_tokens(path, what)
        self._warn_weak()

    def tokens(self) -> list[str]:
        with self._lock:
            if self._watch.changed():
                try:
                    self._tokens = read_tokens(self.path, self.what)
                    log.info("%s %s changed: %d token(s) now", self.what, self.path, len(self._tokens))
                    self._warn_weak()
                except ValueError as exc:
                    log.error("%s; keeping the %d token(s) read before", exc, len(self._tokens))
            return self._tokens

    def first(self) -> str:
        """The token a client sends (the file's first)."""
        return self.tokens()[0]

    def _warn_weak(self) -> None:
        weak = sum(len(t) < MIN_STRONG_TOKEN_CHARS for t in self._tokens)
        if weak:
            log.warning("%s %s: %d token(s) shorter than %d characters; use long random ones "
                        "(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
                        self.what, self.path, weak, MIN_STRONG_TOKEN_CHARS)


class TokenChecker:
    """Whether a presented token is one of a :class:`TokenFile`'s, in constant time."""

    def __init__(self, token_file: TokenFile):
        self.token_file = token_file
        self._seen: list[str] | None = None
        self._digests: list[bytes] = []

    def _current_digests(self) -> list[bytes]:
        tokens = self.token_file.tokens()
        if tokens is not self._seen:
            self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]
            self._seen = tokens
        return self._digests

    def accepts(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        matched = False
        for accepted in self._current_digests():  # every one, always: no early exit
            matched |= hmac.compare_digest(digest, accepted)
        return matched


def bearer_token(metadata: Sequence[tuple[str, object]] | None) -> str | None:
    """The token of the ``authorization: Bearer TOKEN`` entry, or None when there is none.
    ``""`` for an entry of another scheme or without a token."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        return token.strip() if scheme.lower() == BEARER.lower() else ""
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC without an accepted bearer token with UNAUTHENTICATED, except the
    methods under ``open_prefixes`` (health). Refused calls never reach the handler, nor the
    interceptors after this one, and their request is not even parsed."""

    def __init__(self, checker: TokenChecker, open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES,
                 registry=None):
        self.checker = checker
        self.open_prefixes = tuple(open_prefixes)
        # Refusals by reason (a fixed set of labels: the method a caller without a token names
        # may not exist, and must not become a label).
        self.refused = None
        if registry is not None:
            from prometheus_client import Counter

            self.refused = Counter("pllava_grpc_server_unauthenticated",
                                   "RPCs refused with UNAUTHENTICATED, by reason (missing, malformed, rejected)",
                                   ("reason",), registry=registry)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self.open_prefixes):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token and self.checker.accepts(token):
            return await continuation(handler_call_details)
        if token is None:
            reason, problem = "missing", ("this server requires a bearer token and the call carried none: send "
                                          "'authorization: Bearer TOKEN' metadata (Client(token=...), "
                                          "pllava-caption --token or PLLAVA_TOKEN)")
        elif not token:
            reason, problem = "malformed", "the authorization metadata must be 'Bearer TOKEN'"
        else:
            reason, problem = "rejected", "the bearer token is not accepted by this server"
        if self.refused is not None:
            self.refused.labels(reason).inc()
        handler = await continuation(handler_call_details)
        return _refusing(handler, method, problem)


def _refusing(handler: grpc.RpcMethodHandler | None, method: str, problem: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED without reading the request
    (unknown methods too: a caller without a token does not learn which methods exist)."""
    async def refuse(request_or_iterator, context):
        # (the method path is the caller's text: escaped, so it cannot forge a log line)
        log.warning("refused %s from %s: UNAUTHENTICATED: %s", display_name(method), context.peer(), problem)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    if handler is None:
        return grpc.stream_stream_rpc_method_handler(refuse)
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    return handler._replace(**{kind: refuse}, request_deserializer=None, response_serializer=None)


# ---- TLS -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TlsFiles:
    cert: bytes
    key: bytes
    client_ca: bytes | None


def load_tls_files(cert: str, key: str, client_ca: str | None) -> _TlsFiles:
    """Read the server's certificate chain, its key and the client CA, and check that they
    load together: ValueError naming the file for a missing file, a key that does not
    match the certificate, an encrypted key, or a file that is not PEM."""
    cert_pem = read_pem(cert, "tls_cert", "CERTIFICATE")
    key_pem = read_pem(key, "tls_key", "PRIVATE KEY")
    ca_pem = read_pem(client_ca, "tls_client_ca", "CERTIFICATE") if client_ca else None

    def no_password():
        raise ValueError(f"tls_key {key} is encrypted; the servers need an unencrypted key (keep it "
                         "readable only by the server's user)")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        raise ValueError(f"tls_cert {cert} and tls_key {key} do not load together ({exc.reason or exc}): is the "
                         "key the one the certificate was issued for?") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ValueError(f"tls_client_ca {client_ca}: not a usable CA certificate ({exc.reason or exc})") from None
    return _TlsFiles(cert_pem, key_pem, ca_pem)


class ServerTls:
    """TLS server credentials from files, read again when they change (see the module docstring)."""

    def __init__(self, cert: str, key: str, client_ca: str | None = None):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._files = load_tls_files(cert, key, client_ca)
        self._watch = _WatchedFiles([cert, key, client_ca or ""])

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def _configuration(self, files: _TlsFiles):
        return grpc.ssl_server_certificate_configuration([(files.key, files.cert)],
                                                         root_certificates=files.client_ca)

    def _fetch(self):
        """gRPC asks on every new connection: a new configuration when the files changed and
        load, None to keep the current one."""
        with self._lock:
            if self._watch.changed():
                try:
                    self._files = load_tls_files(self.cert, self.key, self.client_ca)
                except ValueError as exc:  # e.g. the new key is there and its certificate not yet
                    log.error("TLS files changed but do not load (%s); keeping the previous ones", exc)
                    return None
                log.info("TLS files changed: serving the new certificate %s", self.cert)
                return self._configuration(self._files)
            return None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._configuration(self._files), self._fetch,
                                                   require_client_authentication=self.mutual)


# ---- both --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerSecurity:
    """TLS (or None: plaintext) and token checking (or None: no tokens) of one server."""

    tls: ServerTls | None = None
    tokens: TokenChecker | None = None

    @classmethod
    def from_settings(cls, settings) -> "ServerSecurity":
        """From a server settings' ``tls_cert``, ``tls_key``, ``tls_client_ca`` and
        ``auth_token_file`` (the files are read and checked now: ValueError)."""
        tls = ServerTls(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls_cert else None
        tokens = TokenChecker(TokenFile(settings.auth_token_file)) if settings.auth_token_file else None
        return cls(tls, tokens)

    def interceptors(self, registry=None) -> list[grpc.aio.ServerInterceptor]:
        """The token check, if tokens are required; refusals counted in ``registry`` if given."""
        return [TokenAuthInterceptor(self.tokens, registry=registry)] if self.tokens is not None else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.credentials())

    def describe(self) -> str:
        """One phrase for the start-up log."""
        if self.tls is None:
            transport = "plaintext (no TLS)"
        elif self.tls.mutual:
            transport = f"TLS with client certificates signed by {self.tls.client_ca} required"
        else:
            transport = "TLS"
        if self.tokens is None:
            return transport + ", no token required"
        return (f"{transport}, bearer token required ({len(self.tokens.token_file.tokens())} accepted, from "
                f"{self.tokens.token_file.path}; health checks open)")

    def warnings(self) -> list[str]:
        if self.tokens is not None and self.tls is None:
            return ["tokens travel unencrypted without TLS: set tls_cert and tls_key unless the network "
                    "between clients and this server is private"]
        return []

