"""Ask a server's standard gRPC health service whether it is SERVING.

    python -m pllava_client.health HOST:PORT [--service NAME] [--timeout S]
                                   [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]

Exits 0 if and only if the server answers SERVING, else 1 (2 for unusable TLS options;
Docker healthchecks treat any non-zero status as unhealthy), printing the status or the reason on one line. An empty
``--service`` (the default) asks about the server as a whole; a service name such as
``pllava.v1.Decoder`` asks about that service.

Health needs no token, even on servers that require one for everything else; a TLS server
needs ``--tls-ca`` (and, if it requires client certificates, ``--tls-cert``/``--tls-key``).
"""
from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .channel import channel_options, tls_server_name
from .security import ClientTls, explain_unavailable, secure_or_insecure_channel


def check_health(target: str, service: str = "", timeout: float = 5.0, tls: ClientTls | None = None,
                 wait_for_ready: bool = True) -> str:
    """Return the status name the health service at ``target`` reports for ``service``
    (``"SERVING"``, ``"NOT_SERVING"``, ``"UNKNOWN"``, ``"SERVICE_UNKNOWN"``); over TLS with
    ``tls`` (:meth:`ClientTls.from_files`). ``wait_for_ready``: wait up to ``timeout`` for a
    connection (a server still starting) rather than fail at once with its reason.

    Raises ``grpc.RpcError`` when the call fails (unreachable server, unknown service
    -> NOT_FOUND, no health service -> UNIMPLEMENTED, deadline exceeded).
    """
    options = channel_options()
    name = tls_server_name(target) if tls is not None else None
    if name:
        options.append(("grpc.ssl_target_name_override", name))
    with secure_or_insecure_channel(target, tls, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=timeout, wait_for_ready=wait_for_ready)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_until_serving(target: str, service: str = "", timeout: float = 60.0,
                       interval: float = 0.2, tls: ClientTls | None = None) -> bool:
    """Poll until ``target`` reports SERVING; return False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            if check_health(target, service, timeout=min(left, 5.0), tls=tls) == "SERVING":
                return True
        except grpc.RpcError:
            pass
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pllava_client.health",
        description="Exit 0 iff the gRPC health service at HOST:PORT answers SERVING.")
    parser.add_argument("target", metavar="HOST:PORT", help="server address (any gRPC target)")
    parser.add_argument("--service", default="",
                        help="service to ask about; empty (default) = the whole server")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="seconds to wait for an answer (default 5)")
    parser.add_argument("--tls-ca", metavar="FILE", help="connect over TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="client certificate, for servers that require one (with --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")
    args = parser.parse_args(argv)
    what = f"{args.target}" + (f" service {args.service!r}" if args.service else "")
    try:
        tls = ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key,
                                   names=("--tls-ca", "--tls-cert", "--tls-key"))
        status = check_health(args.target, args.service, args.timeout, tls=tls)
    except ValueError as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        code = err.code().name if hasattr(err, "code") else "ERROR"
        details = err.details() if hasattr(err, "details") else str(err)
        if code == "DEADLINE_EXCEEDED":
            details = f"no answer within {args.timeout:g} s (server down or still starting)"
            why = _connection_error(args.target, tls)
            if why:
                details += f"; connecting fails: {why}"
        elif code == "UNAVAILABLE":
            details = explain_unavailable(details, tls, plaintext_hint="--tls-ca")
        print(f"{what}: {code}: {details}", file=sys.stderr)
        return 1
    print(f"{what}: {status}")
    return 0 if status == "SERVING" else 1


def _connection_error(target: str, tls: ClientTls | None) -> str | None:
    """Why a connection to ``target`` fails right now (TLS mismatches explained), if it does."""
    try:
        check_health(target, timeout=2.0, tls=tls, wait_for_ready=False)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            return explain_unavailable(err.details() or "", tls, plaintext_hint="--tls-ca")
    return None


if __name__ == "__main__":
    sys.exit(main())
