"""pllava_serving in-process: the error interceptor's status codes, health until warm-up,
draining, and binding. Real grpc.aio servers on 127.0.0.1 with stand-in servicers."""
from __future__ import annotations

import asyncio
import re
import gc
import logging
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from pllava.generation import ContextOverflowError
from pllava.video import VideoError
from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc
from pllava_serving.errors import Overloaded, Unavailable, current_request_id
from pllava_serving.server import Service, create_server, freeze_startup_heap, stop_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# EncodeRequest.video_name selects what the stand-in servicer raises.
RAISES = {
    "value": ValueError("num_frames must be positive"),
    "video": VideoError("clip.mp4: the file is truncated"),
    "context": ContextOverflowError("prompt of 5000 tokens exceeds the max context 4096"),
    "overloaded": Overloaded("queue full (max_queue=2)"),
    "unavailable": Unavailable("still loading"),
    "timeout": TimeoutError("waited 3 s for an encoder"),
    "bug": KeyError("oops"),
}


class StandIn(pllava_pb2_grpc.EncoderServicer):
    """Raises what the request names, before or after its first message."""

    def __init__(self, downstream: str | None = None):
        self.downstream = downstream
        self.seen_ids: list[str] = []

    async def Encode(self, request, context):
        self.seen_ids.append(current_request_id())
        if request.num_frames == 1:  # fail mid-stream, after the header went out
            yield pllava_pb2.EncodeResponse(header=pllava_pb2.EncodeHeader(num_frames=1))
        if request.video_name == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "chosen by the servicer")
        if request.video_name == "downstream":
            async with grpc.aio.insecure_channel(self.downstream) as channel:
                await pllava_pb2_grpc.EncoderStub(channel).GetInfo(pllava_pb2.GetInfoRequest())
        if request.video_name in RAISES:
            raise RAISES[request.video_name]
        if request.video_name == "slow":  # streams until the client goes away
            for _ in range(600):
                yield pllava_pb2.EncodeResponse(header=pllava_pb2.EncodeHeader(num_frames=3))
                await asyncio.sleep(0.05)
        yield pllava_pb2.EncodeResponse(header=pllava_pb2.EncodeHeader(num_frames=2))

    async def GetInfo(self, request, context):
        raise ValueError("the downstream server says no")


async def with_server(body, downstream: str | None = None, registry: CollectorRegistry | None = None):
    servicer = StandIn(downstream)
    server, port, state = await create_server("127.0.0.1:0", [Service.pllava("Encoder", servicer)],
                                              registry=registry)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await body(channel, state, servicer, port)
    finally:
        await server.stop(0)


async def call_encode(channel, metadata=None, **fields):
    call = pllava_pb2_grpc.EncoderStub(channel).Encode(pllava_pb2.EncodeRequest(**fields), metadata=metadata)
    try:
        return [r async for r in call], None, await call.trailing_metadata()
    except grpc.aio.AioRpcError as err:
        return None, err, err.trailing_metadata()


@pytest.mark.parametrize("kind, code", [
    ("value", grpc.StatusCode.INVALID_ARGUMENT),
    ("video", grpc.StatusCode.INVALID_ARGUMENT),
    ("context", grpc.StatusCode.INVALID_ARGUMENT),
    ("overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("unavailable", grpc.StatusCode.UNAVAILABLE),
    ("timeout", grpc.StatusCode.DEADLINE_EXCEEDED),
])
@pytest.mark.parametrize("mid_stream", [False, True])
def test_exceptions_become_status_codes_with_their_message(kind, code, mid_stream):
    async def body(channel, state, servicer, port):
        await state.set_serving()
        return await call_encode(channel, video_name=kind, num_frames=int(mid_stream), request_id="req-7")

    responses, err, trailers = asyncio.run(with_server(body))
    assert responses is None and err.code() == code
    assert err.details() == str(RAISES[kind])
    assert ("request-id", "req-7") in tuple(trailers)


def test_unexpected_exceptions_are_internal_with_the_request_id_and_a_logged_traceback(caplog):
    async def body(channel, state, servicer, port):
        return await call_encode(channel, video_name="bug")

    with caplog.at_level(logging.ERROR, logger="pllava_serving.errors"):
        responses, err, trailers = asyncio.run(with_server(body))
    assert err.code() == grpc.StatusCode.INTERNAL
    rid = dict(tuple(trailers))["request-id"]
    assert len(rid) == 12  # no request_id given: one was made up
    assert err.details() == (f"internal error while handling request {rid}; "
                             "the server log has the details under that id")
    assert "oops" not in err.details()
    record = next(r for r in caplog.records if "internal error" in r.getMessage())
    assert record.exc_info and record.exc_info[0] is KeyError


def test_aborts_pass_through_and_downstream_statuses_propagate():
    async def body(channel, state, servicer, port):
        async def outer(channel2, state2, servicer2, port2):
            return (await call_encode(channel2, video_name="abort"),
                    await call_encode(channel2, video_name="downstream"))
        return await with_server(outer, downstream=f"127.0.0.1:{port}")

    (_, aborted, _), (_, downstream, _) = asyncio.run(with_server(body))
    assert aborted.code() == grpc.StatusCode.NOT_FOUND and aborted.details() == "chosen by the servicer"
    assert downstream.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert downstream.details() == "the downstream server says no"


def test_unary_methods_are_mapped_too():
    async def body(channel, state, servicer, port):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pllava_pb2_grpc.EncoderStub(channel).GetInfo(pllava_pb2.GetInfoRequest())
        return err.value

    err = asyncio.run(with_server(body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "the downstream server says no"


def test_health_is_not_serving_until_set_serving_and_after_draining():
    async def body(channel, state, servicer, port):
        health = health_pb2_grpc.HealthStub(channel)

        async def statuses():
            return [(await health.Check(health_pb2.HealthCheckRequest(service=s))).status
                    for s in ("", "pllava.v1.Encoder")]

        seen = [await statuses()]
        await state.set_serving()
        seen.append(await statuses())
        responses, _, _ = await call_encode(channel, video_name="fine")
        await state.start_draining()
        seen.append(await statuses())
        await state.set_serving()  # ignored once draining
        seen.append(await statuses())
        _, refused, _ = await call_encode(channel, video_name="fine")
        return seen, responses, refused

    seen, responses, refused = asyncio.run(with_server(body))
    assert seen == [[NOT_SERVING] * 2, [SERVING] * 2, [NOT_SERVING] * 2, [NOT_SERVING] * 2]
    assert responses[0].header.num_frames == 2
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.details()


def test_request_ids_reach_the_servicer():
    async def body(channel, state, servicer, port):
        await call_encode(channel, video_name="fine", request_id="abc")
        await call_encode(channel, video_name="fine")
        return servicer.seen_ids

    given, made_up = asyncio.run(with_server(body))
    assert given == "abc" and len(made_up) == 12 and made_up != "abc"


def test_request_ids_come_from_x_request_id_metadata_when_the_field_is_empty():
    async def body(channel, state, servicer, port):
        await state.set_serving()
        _, _, trailers = await call_encode(channel, metadata=(("x-request-id", "trace-9"),), video_name="fine")
        await call_encode(channel, metadata=(("x-request-id", "trace-9"),), video_name="fine", request_id="field")
        await call_encode(channel, metadata=(("x-request-id", "an id with spaces"),), video_name="fine")
        await call_encode(channel, metadata=(("x-request-id", "x" * 500),), video_name="fine")
        return servicer.seen_ids, trailers

    (from_metadata, field_wins, spaces, too_long), trailers = asyncio.run(with_server(body))
    assert from_metadata == "trace-9" and ("request-id", "trace-9") in tuple(trailers)  # OK calls carry it too
    assert field_wins == "field"
    assert len(spaces) == 12 and len(too_long) == 12  # unusable ids are replaced by fresh ones


def handled(registry: CollectorRegistry, method: str, code: str) -> float:
    value = registry.get_sample_value("pllava_grpc_server_handled_total", {
        "grpc_service": "pllava.v1.Encoder", "grpc_method": method,
        "grpc_type": "unary" if method == "GetInfo" else "server_stream", "grpc_code": code})
    return value or 0.0


def test_every_rpc_is_counted_by_its_final_status_streams_and_cancellations_included():
    registry = CollectorRegistry()

    async def body(channel, state, servicer, port):
        await state.set_serving()
        await call_encode(channel, video_name="fine")
        await call_encode(channel, video_name="fine", num_frames=1)
        await call_encode(channel, video_name="video")                 # INVALID_ARGUMENT
        await call_encode(channel, video_name="video", num_frames=1)   # ... after the first message
        await call_encode(channel, video_name="bug")                   # INTERNAL
        await call_encode(channel, video_name="abort")                 # the servicer's own NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError):
            await pllava_pb2_grpc.EncoderStub(channel).GetInfo(pllava_pb2.GetInfoRequest())
        stub = pllava_pb2_grpc.EncoderStub(channel)
        call = stub.Encode(pllava_pb2.EncodeRequest(video_name="slow"))
        await call.read()
        call.cancel()                                                   # CANCELLED by the client
        expiring = stub.Encode(pllava_pb2.EncodeRequest(video_name="slow"), timeout=0.5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in expiring:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await state.start_draining()
        await call_encode(channel, video_name="fine")                   # UNAVAILABLE: shutting down
        for _ in range(100):  # the server side of the cancelled calls ends a moment later
            if handled(registry, "Encode", "CANCELLED") and handled(registry, "Encode", "DEADLINE_EXCEEDED"):
                break
            await asyncio.sleep(0.05)

    asyncio.run(with_server(body, registry=registry))
    assert {code: handled(registry, "Encode", code) for code in (
        "OK", "INVALID_ARGUMENT", "INTERNAL", "NOT_FOUND", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE")} == {
        "OK": 2, "INVALID_ARGUMENT": 2, "INTERNAL": 1, "NOT_FOUND": 1, "CANCELLED": 1, "DEADLINE_EXCEEDED": 1,
        "UNAVAILABLE": 1}
    assert handled(registry, "GetInfo", "INVALID_ARGUMENT") == 1
    started = registry.get_sample_value("pllava_grpc_server_started_total", {
        "grpc_service": "pllava.v1.Encoder", "grpc_method": "Encode", "grpc_type": "server_stream"})
    assert started == 9
    assert registry.get_sample_value("pllava_grpc_server_handling_seconds_count", {
        "grpc_service": "pllava.v1.Encoder", "grpc_method": "Encode", "grpc_type": "server_stream"}) == 9


def test_calls_cut_at_shutdown_are_the_servers_doing_in_logs_and_metrics(caplog):
    """Past the grace period the server cuts what still runs: the client gets UNAVAILABLE,
    and the log and the metrics say so (they said CANCELLED, "the client went away")."""
    registry = CollectorRegistry()
    caplog.set_level("INFO", logger="pllava_serving.errors")

    async def main():
        server, port, state = await create_server("127.0.0.1:0", [Service.pllava("Encoder", StandIn())],
                                                  registry=registry)
        await server.start()
        await state.set_serving()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pllava_pb2_grpc.EncoderStub(channel).Encode(pllava_pb2.EncodeRequest(video_name="slow"))
            await call.read()
            await state.start_draining()
            await stop_server(server, state, 0)  # what serve_forever does once grace_s has passed
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:
                    pass
        for _ in range(100):  # the handler's end is seen a moment later
            if handled(registry, "Encode", "UNAVAILABLE"):
                break
            await asyncio.sleep(0.05)
        return err.value

    refused = asyncio.run(main())
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert (handled(registry, "Encode", "UNAVAILABLE"), handled(registry, "Encode", "CANCELLED")) == (1, 0)
    lines = [r.getMessage() for r in caplog.records if "Encode ->" in r.getMessage()]
    assert len(lines) == 1 and re.fullmatch(r"/pllava\.v1\.Encoder/Encode -> UNAVAILABLE after [\d.]+ s: the server "
                                            r"cut it, shutting down past grace_s", lines[0]), lines


def test_port_zero_picks_a_free_port_and_a_taken_port_is_an_error():
    async def body(channel, state, servicer, port):
        assert port > 0
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await create_server(f"127.0.0.1:{port}", [Service.pllava("Encoder", StandIn())])
        return port

    asyncio.run(with_server(body))
    with socket.socket() as sock:  # a port held by something else entirely
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]

        async def bind_taken():
            with pytest.raises(OSError, match="cannot listen"):
                await create_server(f"127.0.0.1:{taken}", [Service.pllava("Encoder", StandIn())])
        asyncio.run(bind_taken())


def test_the_startup_heap_is_frozen_out_of_later_collections(caplog):
    """What a server holds once warmed up is left out of later collections: a full pass then
    walks only what was made since."""
    kept = [[i] for i in range(50_000)]  # stands for a loaded model's objects
    try:
        with caplog.at_level(logging.INFO, logger="pllava_serving.server"):
            frozen, seconds = freeze_startup_heap()
        assert frozen >= len(kept) and gc.get_freeze_count() >= len(kept) and seconds >= 0
        assert f"startup heap frozen: {frozen} objects" in caplog.text
        gc.collect()
        assert gc.get_freeze_count() >= len(kept)  # a later full pass leaves them frozen
        cycle = [None]
        cycle[0] = cycle
        del cycle
        assert gc.collect() >= 1  # and still collects new garbage
    finally:
        gc.unfreeze()
