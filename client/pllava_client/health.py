"""Ask a server's standard gRPC health service whether it is SERVING.

    python -m pllava_client.health HOST:PORT [--service NAME] [--timeout S]

Exits 0 if and only if the server answers SERVING, else 1 (Docker healthchecks treat any
non-zero status as unhealthy), printing the status or the reason on one line. An empty
``--service`` (the default) asks about the server as a whole; a service name such as
``pllava.v1.Decoder`` asks about that service.
"""
from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .channel import channel_options


def check_health(target: str, service: str = "", timeout: float = 5.0) -> str:
    """Return the status name the health service at ``target`` reports for ``service``
    (``"SERVING"``, ``"NOT_SERVING"``, ``"UNKNOWN"``, ``"SERVICE_UNKNOWN"``).

    Raises ``grpc.RpcError`` when the call fails (unreachable server, unknown service
    -> NOT_FOUND, no health service -> UNIMPLEMENTED, deadline exceeded).
    """
    with grpc.insecure_channel(target, options=channel_options()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=timeout, wait_for_ready=True)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_until_serving(target: str, service: str = "", timeout: float = 60.0,
                       interval: float = 0.2) -> bool:
    """Poll until ``target`` reports SERVING; return False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            if check_health(target, service, timeout=min(left, 5.0)) == "SERVING":
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
    args = parser.parse_args(argv)
    what = f"{args.target}" + (f" service {args.service!r}" if args.service else "")
    try:
        status = check_health(args.target, args.service, args.timeout)
    except grpc.RpcError as err:
        code = err.code().name if hasattr(err, "code") else "ERROR"
        details = err.details() if hasattr(err, "details") else str(err)
        if code == "DEADLINE_EXCEEDED":
            details = f"no answer within {args.timeout:g} s (server down or still starting)"
        print(f"{what}: {code}: {details}", file=sys.stderr)
        return 1
    print(f"{what}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
