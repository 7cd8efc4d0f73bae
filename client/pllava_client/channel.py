"""gRPC channel and server options shared by the client, the decoder and the encoder.

A whole video travels in one request message and a visual-token tensor is far above gRPC's
4 MiB default, so both ends raise the message size limits to :data:`MAX_MESSAGE_BYTES`.
Keepalive pings keep long captions' idle-looking connections alive through proxies and
notice dead peers; the server side allows pings as often as clients send them, or it would
answer them with GOAWAY "too_many_pings".

    grpc.insecure_channel(target, options=channel_options())
    grpc.insecure_channel("dns:///encoder:50051", options=channel_options(round_robin=True))
    grpc.server(executor, options=server_options())

A channel that lost its server reconnects at most :data:`MAX_RECONNECT_BACKOFF_MS` apart
(gRPC's default grows to 120 s), so a server restarted on the same address is connected again
while it is still loading, long before it serves: a client or decoder made before the restart
works after it.

A target may name several servers: :func:`grpc_target` turns the comma list
``host:p1,host:p2`` into gRPC's static ``ipv4:``/``ipv6:`` form, and with round robin a channel
spreads its calls over every address. Servers close each connection after
:data:`MAX_CONNECTION_AGE_MS` (running calls finish first), so a ``dns:///`` client resolves
the name again and finds replicas added since it connected.
"""
from __future__ import annotations

import ipaddress
import json
import socket

#: Largest message either side sends or accepts (a whole video file in one request).
MAX_MESSAGE_BYTES = 64 << 20

#: A client pings an idle connection this often ...
KEEPALIVE_TIME_MS = 30_000
#: ... and gives the connection up when the ping is not answered within this time.
KEEPALIVE_TIMEOUT_MS = 10_000
#: The server accepts client pings this close together (must stay below KEEPALIVE_TIME_MS).
MIN_CLIENT_PING_INTERVAL_MS = 10_000
#: A server asks clients to reconnect (GOAWAY) after this long; calls in progress are not cut
#: (no grace limit). Reconnecting re-resolves ``dns:///`` names, so scaled-up replicas get work.
MAX_CONNECTION_AGE_MS = 300_000

#: A channel whose server went away tries to reconnect after this long at first ...
INITIAL_RECONNECT_BACKOFF_MS = 500
#: ... and never waits longer than this between two tries.
MAX_RECONNECT_BACKOFF_MS = 2_000

#: Target schemes gRPC Python resolves itself; any other target is a host:port (list).
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")

Options = list[tuple[str, object]]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES, *,
                    round_robin: bool = False,
                    keepalive_time_ms: int = KEEPALIVE_TIME_MS,
                    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS,
                    service_config: dict | None = None) -> Options:
    """Options for ``grpc.insecure_channel`` / ``grpc.aio.insecure_channel``.

    ``round_robin=True`` spreads calls over every address the target resolves to (for
    example ``dns:///encoder:50051`` with scaled encoder replicas) instead of gRPC's default
    pick-first, which sends every call to one of them. ``service_config`` is a gRPC service
    config (health checking, e.g. :func:`health_checked`).
    """
    options = _shared_options(max_message_bytes, keepalive_time_ms, keepalive_timeout_ms)
    options += [
        ("grpc.enable_retries", 1),
        # gRPC's transparent retry (a call no server has seen) resends the request, which
        # carries a whole video: keep all of it (gRPC keeps 256 KiB by default and never
        # retries a call whose request was larger). No retry policy: the client retries
        # captions itself (pllava_client.retry says why).
        ("grpc.per_rpc_retry_buffer_size", int(max_message_bytes)),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
    if round_robin:
        options.append(("grpc.lb_policy_name", "round_robin"))
    if service_config is not None:
        options.append(("grpc.service_config", json.dumps(service_config)))
    return options


def health_checked(service: str) -> dict:
    """A service config that makes a round-robin channel send calls only to servers whose
    health service reports ``service`` SERVING: a replica that is still loading or draining
    is skipped instead of answering UNAVAILABLE, and one that turns SERVING gets calls at
    once."""
    return {"healthCheckConfig": {"serviceName": service}}


def _shared_options(max_message_bytes: int, keepalive_time_ms: int, keepalive_timeout_ms: int) -> Options:
    """Message size limits and keepalive, the same on both ends."""
    return [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.keepalive_time_ms", int(keepalive_time_ms)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES, *,
                   keepalive_time_ms: int = KEEPALIVE_TIME_MS,
                   keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS,
                   min_client_ping_interval_ms: int = MIN_CLIENT_PING_INTERVAL_MS,
                   max_connection_age_ms: int = MAX_CONNECTION_AGE_MS) -> Options:
    """Options for ``grpc.server`` / ``grpc.aio.server``."""
    return _shared_options(max_message_bytes, keepalive_time_ms, keepalive_timeout_ms) + [
        ("grpc.http2.min_ping_interval_without_data_ms", int(min_client_ping_interval_ms)),
        # Answer over-eager pings with GOAWAY only after this many (gRPC's default).
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_age_ms", int(max_connection_age_ms)),
    ]


def grpc_target(address: str) -> str:
    """The target for ``grpc.insecure_channel`` that ``address`` means.

    A comma list of ``host:port`` (``a:50052,b:50052``, ``[::1]:50052,[::1]:50053``) becomes
    gRPC's static ``ipv4:``/``ipv6:`` target, host names resolved here, once (to their IPv4
    addresses when they have any). Any other target (``localhost:50052``,
    ``dns:///decoders:50052``, ``ipv4:...``, ``unix:...``) is returned unchanged: gRPC
    resolves it. ValueError for a malformed list or a name that does not resolve.
    """
    address = address.strip()
    if address.startswith(SCHEMES) or "," not in address:
        return address
    v4, v6 = [], []
    for host, port in _host_ports(address):
        ips = _resolve(host, port)
        ips = [ip for ip in ips if ":" not in ip] or ips
        for ip in ips:
            (v6 if ":" in ip else v4).append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    if v4 and v6:
        raise ValueError(f"{address!r} mixes IPv4 and IPv6-only servers; a static list takes one family")
    return ("ipv4:" if v4 else "ipv6:") + ",".join(dict.fromkeys(v4 or v6))


def tls_server_name(address: str) -> str | None:
    """The name a TLS channel to ``address`` must check the servers' certificates against,
    when gRPC would not find it itself; None when it does.

    gRPC checks a certificate against the target's host, which a static list
    (``host:p1,host:p2`` or ``ipv4:127.0.0.1:p1,127.0.0.1:p2``) does not have: there it is the
    list's one host. One channel checks every server against one name, so a TLS list must name
    one host; for several hosts use a DNS name that resolves to all of them and that their
    certificates list. ValueError for a list of several hosts.
    """
    address = address.strip()
    if address.startswith(("ipv4:", "ipv6:")):
        items = address.split(":", 1)[1]
    elif "," in address and not address.startswith(SCHEMES):
        items = address
    else:
        return None
    hosts = {host.lower() for host, _ in _host_ports(items)}
    if len(hosts) != 1:
        raise ValueError(f"{address!r} names several hosts ({', '.join(sorted(hosts))}); over TLS a list "
                         "must name one host, the one the certificates are for. For several hosts use a "
                         "dns:/// name that resolves to all of them and that their certificates list")
    return hosts.pop()


def stays_on_this_machine(address: str) -> bool:
    """Whether every server ``address`` names is this machine: loopback hosts or addresses
    (``localhost``, 127.0.0.0/8, ::1, ``dns:///localhost:P``, lists of those) or a Unix
    socket. False when it cannot tell."""
    address = address.strip()
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    if address.startswith(("ipv4:", "ipv6:")):
        address = address.split(":", 1)[1]
    elif address.startswith("dns:"):
        address = address[len("dns:"):].lstrip("/")
        if "/" in address:  # dns://AUTHORITY/host:port
            address = address.split("/", 1)[1]
    elif address.startswith(SCHEMES):
        return False
    try:
        hosts = [_split_host_port(item.strip(), 0)[0] for item in address.split(",")]
    except ValueError:
        return False
    return all(_is_loopback(host) for host in hosts)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_count(address: str) -> int | None:
    """How many servers ``address`` names now: the items of a static list, or the addresses
    a ``dns:`` target or host name resolves to here; None when that cannot be known."""
    target = grpc_target(address)
    if target.startswith(("ipv4:", "ipv6:")):
        return len([a for a in target.split(":", 1)[1].split(",") if a])
    rest = target
    if target.startswith("dns:"):
        rest = target[len("dns:"):]
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
            if authority:  # dns://DNS-SERVER/host:port: that server's answer, not ours
                return None
    elif target.startswith(SCHEMES):
        return None
    host, port = _split_host_port(rest, 443)
    try:
        ips = _resolve(host, port)
    except ValueError:
        return None
    v4 = [ip for ip in ips if ":" not in ip]
    return len(v4 or ips) or None


def _host_ports(address: str) -> list[tuple[str, int]]:
    out = []
    for item in (a.strip() for a in address.split(",")):
        if not item:
            raise ValueError(f"empty item in the address list {address!r}")
        host, port = _split_host_port(item, None)
        if port is None:
            raise ValueError(f"{item!r} in {address!r} has no port: write HOST:PORT")
        out.append((host, port))
    return out


def _split_host_port(item: str, default_port: int | None) -> tuple[str, int | None]:
    if item.startswith("["):  # [v6]:port
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = item.rpartition(":")
        if not sep or ":" in host:  # no port, or a bare IPv6 address
            host, port = item, ""
    if not port:
        return host, default_port
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"bad port in {item!r}") from None


def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))
