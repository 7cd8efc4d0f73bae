"""gRPC channel and server options shared by the client, the decoder and the encoder.

A whole video travels in one request message and a visual-token tensor is far above gRPC's
4 MiB default, so both ends raise the message size limits to :data:`MAX_MESSAGE_BYTES`.
Keepalive pings keep long captions' idle-looking connections alive through proxies and
notice dead peers; the server side allows pings as often as clients send them, or it would
answer them with GOAWAY "too_many_pings".

    grpc.insecure_channel(target, options=channel_options())
    grpc.insecure_channel("dns:///encoder:50051", options=channel_options(round_robin=True))
    grpc.server(executor, options=server_options())
"""
from __future__ import annotations

#: Largest message either side sends or accepts (a whole video file in one request).
MAX_MESSAGE_BYTES = 64 << 20

#: A client pings an idle connection this often ...
KEEPALIVE_TIME_MS = 30_000
#: ... and gives the connection up when the ping is not answered within this time.
KEEPALIVE_TIMEOUT_MS = 10_000
#: The server accepts client pings this close together (must stay below KEEPALIVE_TIME_MS).
MIN_CLIENT_PING_INTERVAL_MS = 10_000

Options = list[tuple[str, object]]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES, *,
                    round_robin: bool = False,
                    keepalive_time_ms: int = KEEPALIVE_TIME_MS,
                    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS) -> Options:
    """Options for ``grpc.insecure_channel`` / ``grpc.aio.insecure_channel``.

    ``round_robin=True`` spreads calls over every address the target resolves to (for
    example ``dns:///encoder:50051`` with scaled encoder replicas) instead of gRPC's default
    pick-first, which sends every call to one of them.
    """
    options = _shared_options(max_message_bytes, keepalive_time_ms, keepalive_timeout_ms)
    options.append(("grpc.enable_retries", 1))
    if round_robin:
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


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
                   min_client_ping_interval_ms: int = MIN_CLIENT_PING_INTERVAL_MS) -> Options:
    """Options for ``grpc.server`` / ``grpc.aio.server``."""
    return _shared_options(max_message_bytes, keepalive_time_ms, keepalive_timeout_ms) + [
        ("grpc.http2.min_ping_interval_without_data_ms", int(min_client_ping_interval_ms)),
        # Answer over-eager pings with GOAWAY only after this many (gRPC's default).
        ("grpc.http2.max_ping_strikes", 2),
    ]
