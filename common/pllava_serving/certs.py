"""A private CA, a server certificate and a client certificate for PLLaVA's TLS, and a token.

``pllava make-certs DIR`` and ``pllava up --secure DIR`` write, with keys readable only by
their owner::

    ca.pem, ca-key.pem          the CA that signs the two below (keep ca-key.pem offline, or
                                delete it: it is needed only to sign more certificates)
    server.pem, server-key.pem  both servers' certificate, for the names in ``hosts``
    client.pem, client-key.pem  for clients, the decoder and health checks when the servers
                                require client certificates (mTLS)
    token                       a random bearer token, one line (the servers' token file)

Keys are ECDSA P-256: small, fast handshakes, accepted by every gRPC TLS stack. This is for
a deployment without its own PKI; one that has one (cert-manager, a corporate CA) points the
servers' ``tls_*`` settings at those files instead.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

#: Names the server certificate is valid for unless told otherwise: this machine, and the
#: service names of docker-compose.yml (the decoder reaches ``encoder``, clients ``decoder``).
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", "encoder", "decoder")
#: How long the certificates are valid.
DEFAULT_DAYS = 825
FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem", "token")


@dataclass(frozen=True)
class CertFiles:
    """The paths of what :func:`make_certs` writes in ``folder``."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server-key.pem"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client-key.pem"

    @property
    def token(self) -> Path:
        return self.folder / "token"

    def complete(self) -> bool:
        """Everything a secured cluster needs is there (the CA key is not needed)."""
        return all(p.is_file() for p in (self.ca, self.server_cert, self.server_key, self.client_cert,
                                         self.client_key, self.token))


def make_certs(folder: str | os.PathLike, hosts: Iterable[str] = DEFAULT_HOSTS, *, days: int = DEFAULT_DAYS,
               overwrite: bool = False) -> CertFiles:
    """Write a CA, a server certificate for ``hosts`` (DNS names and IP addresses), a client
    certificate and a token into ``folder`` (created if missing). FileExistsError if any of
    them exists and not ``overwrite``."""
    # Imported here: only making certificates needs it, not serving or connecting.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = list(dict.fromkeys(h.strip() for h in hosts if h.strip()))
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP address")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    out = CertFiles(Path(folder))
    out.folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # parents get the usual mode
    taken = [name for name in FILES if (out.folder / name).exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{out.folder} already holds {', '.join(taken)}; choose an empty folder "
                              "or overwrite them (--force)")

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)  # clock skew
    until = now + datetime.timedelta(days=days)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pllava-serve"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("pllava-serve CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(common_name: str, usage, san: list | None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                                content_commitment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                                  critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    san = []
    for host in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            san.append(x509.DNSName(host))
    server, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, san)
    client, client_key = leaf("pllava-client", ExtendedKeyUsageOID.CLIENT_AUTH, None)

    pem = serialization.Encoding.PEM
    _write(out.ca, ca.public_bytes(pem))
    _write(out.ca_key, key_pem(ca_key), private=True)
    _write(out.server_cert, server.public_bytes(pem) + ca.public_bytes(pem))  # the chain to the CA
    _write(out.server_key, key_pem(server_key), private=True)
    _write(out.client_cert, client.public_bytes(pem) + ca.public_bytes(pem))
    _write(out.client_key, key_pem(client_key), private=True)
    _write(out.token, (new_token() + "\n").encode(), private=True)
    return out


def new_token() -> str:
    """A random bearer token: 256 bits, URL-safe characters."""
    return secrets.token_urlsafe(32)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path`` (replacing it); a private file is created with mode 0600, so
    it is never readable by others, not even for a moment. The temporary file is a new one
    of a random name (``mkstemp``: O_EXCL), so a file or link someone planted in the folder is
    never written through."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if not private:
                os.fchmod(f.fileno(), 0o644)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
