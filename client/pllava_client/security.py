"""The client side of TLS and bearer tokens: channel credentials, the token on every call, and
connection errors explained.

    tls = ClientTls.from_files(ca="ca.pem", cert="client.pem", key="client-key.pem")
    channel = secure_or_insecure_channel(target, tls, options)         # insecure when tls is None
    channel = grpc.intercept_channel(channel, BearerToken(token))      # every call carries it

A client that gets the transport wrong sees only ``UNAVAILABLE: ... Socket closed`` from
gRPC; :func:`explain_unavailable` adds what was probably meant (the server wants TLS, a
client certificate, or a CA that signed its certificate), naming the option to change.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Callable

import grpc

from .channel import Options

#: The metadata key and scheme servers read the token from (RFC 6750 in HTTP/2 headers).
AUTHORIZATION = "authorization"
BEARER = "Bearer"


@dataclass(frozen=True)
class ClientTls:
    """What a client needs to reach a TLS server: the CA that signed the server's certificate
    (PEM bytes) and, for servers that require client certificates (mTLS), a certificate and
    its key."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    names: tuple[str, str, str] = ("tls_ca", "tls_cert", "tls_key")  # how the caller spells them

    @classmethod
    def from_files(cls, ca: str | None, cert: str | None = None, key: str | None = None, *,
                   names: tuple[str, str, str] = ("tls_ca", "tls_cert", "tls_key")) -> "ClientTls | None":
        """Read the PEM files; None when none is given (a plaintext channel). ValueError for a
        certificate without its key (or the reverse), a certificate without a CA, or a file
        that cannot be read or holds no PEM of the right kind."""
        ca_name, cert_name, key_name = names
        if (cert is None) != (key is None):
            raise ValueError(f"{cert_name} and {key_name} go together: give both (a client certificate "
                             "and its private key) or neither")
        if ca is None:
            if cert is not None:
                raise ValueError(f"{cert_name} needs {ca_name} too: the CA that signed the server's certificate")
            return None
        return cls(ca=read_pem(ca, ca_name, "CERTIFICATE"),
                   cert=read_pem(cert, cert_name, "CERTIFICATE") if cert is not None else None,
                   key=read_pem(key, key_name, "PRIVATE KEY") if key is not None else None,
                   names=names)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def unreadable(what: str, path: str, exc: OSError) -> str:
    """Why ``path`` (``what``) cannot be read; for a permission error, which user this process
    runs as and who owns the file: in a container the usual cause is a key readable only by
    its owner on the host (``pllava make-certs`` writes them so)."""
    message = f"{what} {path}: cannot be read ({exc.strerror or exc})"
    if isinstance(exc, PermissionError) and hasattr(os, "geteuid"):
        try:
            owner = f"uid {os.stat(path).st_uid}"
        except OSError:
            owner = "a user whose folder this process cannot enter"
        message += (f"; this process runs as uid {os.geteuid()} and the file belongs to {owner}: run as "
                     "the owner (in docker compose, PLLAVA_USER=UID:GID) or make it readable to this user")
    return message


def read_pem(path: str, what: str, kind: str) -> bytes:
    """The bytes of PEM file ``path``; ValueError naming ``what`` when it cannot be read or
    holds no ``-----BEGIN ...{kind}-----`` block."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(unreadable(what, path, exc)) from None
    if b"-----BEGIN " not in data or kind.encode() + b"-----" not in data:
        raise ValueError(f"{what} {path}: not a PEM file holding a {kind.lower()} "
                         f"(expected a -----BEGIN ...{kind}----- block)")
    return data


def check_token(token: str, what: str = "token") -> str:
    """``token`` if it can travel as a gRPC metadata value; ValueError otherwise."""
    if not token:
        raise ValueError(f"{what} is empty")
    if not all(33 <= ord(ch) <= 126 for ch in token):
        raise ValueError(f"{what} must be printable ASCII without spaces")
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token``."""
    return ((AUTHORIZATION, f"{BEARER} {token}"),)


def secure_or_insecure_channel(target: str, tls: ClientTls | None, options: Options) -> grpc.Channel:
    """A channel to ``target``: TLS with ``tls``, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer TOKEN`` to every call of a channel, whatever the method,
    so no RPC a client makes can forget it (call credentials would do the same but gRPC
    allows them only over TLS, and a token may also be used on a private plaintext network).

    ``token`` is the token, or a function asked for it on every call (a token file that is
    read again when it changes, so a rotated token is followed without a restart)."""

    def __init__(self, token: str | Callable[[], str]):
        self._token = token if callable(token) else (lambda fixed=check_token(token): fixed)

    def _add(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = ([m for m in (details.metadata or ()) if m[0] != AUTHORIZATION]
                    + list(bearer_metadata(self._token())))
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._add(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._add(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._add(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._add(client_call_details), request_iterator)


def explain_unavailable(details: str, tls: ClientTls | None, *, plaintext_hint: str = "tls_ca / --tls-ca",
                        server: str = "the server") -> str:
    """``details`` of an UNAVAILABLE error, with the likely cause when the transport does not
    match the server's (plaintext against TLS, a missing or refused client certificate, an
    unknown CA, a certificate for another name); unchanged otherwise.

    ``plaintext_hint`` names the option that turns TLS on; ``tls.names`` the others.
    """
    text = details or ""
    if "Connection refused" in text or "DNS resolution failed" in text:
        return text  # nothing listens there: not a TLS question
    if tls is None:
        if "Socket closed" in text or "Connection reset" in text or "handshake" in text.lower():
            return (f"{text} -- {server} may require TLS: pass {plaintext_hint} (the CA certificate that "
                    "signed the server's certificate)")
        return text
    ca_name, cert_name, key_name = tls.names
    if "WRONG_VERSION_NUMBER" in text:
        return (f"{text} -- {server} does not speak TLS on this port: connect without {ca_name}, or turn TLS "
                "on at the server")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (f"{text} -- {server}'s TLS certificate is not signed by the CA in {ca_name} (or has "
                "expired): pass the CA that signed it")
    if "Hostname Verification" in text:
        return (f"{text} -- {server}'s TLS certificate is not valid for the host name connected to: "
                "connect by a name the certificate lists, or issue one that lists this name")
    if "Socket closed" in text or "Connection reset" in text:
        if tls.cert is None:
            return (f"{text} -- {server} may require a client certificate (mutual TLS): pass {cert_name} "
                    f"and {key_name}")
        return (f"{text} -- {server} may have refused this client certificate: it must be signed by the "
                "CA the server trusts for clients")
    return text
