"""python -m pllava_client.health against a real in-process gRPC health service."""
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

CLIENT = Path(__file__).resolve().parent.parent / "client"

from pllava_client.channel import channel_options, server_options

SERVICE = "pllava.v1.Decoder"


@pytest.fixture(scope="module")
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options())
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    assert port > 0
    srv.start()
    yield f"127.0.0.1:{port}", servicer
    srv.stop(grace=None)


def run_health(*args, timeout=20):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLIENT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pllava_client.health", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_serving_exits_zero_and_not_serving_exits_nonzero(server):
    target, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    ok = run_health(target, "--timeout", "5")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SERVING" in ok.stdout

    down = run_health(target, "--service", SERVICE, "--timeout", "5")
    assert down.returncode != 0
    assert "NOT_SERVING" in down.stdout

    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    up = run_health(target, "--service", SERVICE, "--timeout", "5")
    assert up.returncode == 0, up.stdout + up.stderr

    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_health(target).returncode != 0


def test_unknown_service_and_unreachable_server_exit_nonzero(server):
    target, _ = server
    unknown = run_health(target, "--service", "no.such.Service", "--timeout", "5")
    assert unknown.returncode != 0
    assert "NOT_FOUND" in unknown.stderr

    # A port nobody listens on: bind one, close it, then ask.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    gone = run_health(f"127.0.0.1:{free}", "--timeout", "0.5")
    assert gone.returncode != 0
    assert gone.stderr.strip()


def test_channel_options_carry_the_raised_limits():
    opts = dict(channel_options())
    assert opts["grpc.max_receive_message_length"] == opts["grpc.max_send_message_length"] >= 64 << 20
    assert dict(channel_options(round_robin=True))["grpc.lb_policy_name"] == "round_robin"
    sopts = dict(server_options())
    assert sopts["grpc.max_receive_message_length"] >= 64 << 20
    # The server accepts client keepalive pings at least as often as clients send them.
    assert sopts["grpc.http2.min_ping_interval_without_data_ms"] <= opts["grpc.keepalive_time_ms"]


def test_large_messages_pass_with_the_options():
    """20 MB each way (far above gRPC's 4 MiB default) goes through with these options; a
    channel with default options refuses the same reply."""
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=server_options())
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Echo", {"Echo": echo})])
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    payload = os.urandom(20 << 20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as ch:
            assert ch.unary_unary("/t.Echo/Echo")(payload, timeout=20) == payload
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary("/t.Echo/Echo")(payload, timeout=20)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        srv.stop(grace=None)
