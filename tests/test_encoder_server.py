"""The real ``pllava-encoder`` as a subprocess on 127.0.0.1, spoken to over gRPC."""
from __future__ import annotations

import io
import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from pllava.config import PllavaConfig, PreprocessorConfig
from pllava.model import PllavaVision
from pllava.runtime import setup_backend
from pllava.video import load_frames, preprocess
from pllava_client import CaptionError
from pllava_client.channel import channel_options
from pllava_client.codec import TensorAssembler
from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc
from pllava_serving.model_id import model_id
from servers import start_encoder

import odd_media

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def encoder(tiny_model_dir, tmp_path_factory):
    with start_encoder(tiny_model_dir, log_dir=tmp_path_factory.mktemp("encoder-logs")) as server:
        yield server
        assert server.alive(), server.log_tail()


@pytest.fixture(scope="module")
def stub(encoder):
    with grpc.insecure_channel(encoder.address, options=channel_options()) as channel:
        yield pllava_pb2_grpc.EncoderStub(channel)


def encode(stub, video: bytes, num_frames: int = 0, **kwargs):
    """Call Encode; return (header, tensor)."""
    responses = stub.Encode(pllava_pb2.EncodeRequest(video=video, num_frames=num_frames, **kwargs), timeout=120)
    return collect(responses)


def collect(responses):
    first = next(responses)
    assert first.WhichOneof("payload") == "header"
    assembler = TensorAssembler(first.header.visual_tokens)
    for response in responses:
        assert response.WhichOneof("payload") == "chunk"
        assembler.add(response.chunk)
    return first.header, assembler.finish()


def in_process_tokens(model_dir, video, num_frames: int | None = None) -> np.ndarray:
    cfg = PllavaConfig.from_pretrained(model_dir).with_frames(num_frames)
    vision = PllavaVision.from_pretrained(model_dir, cfg, setup_backend("CPU", 0, None))
    pixels = preprocess(load_frames(video, cfg.num_frames).frames, PreprocessorConfig.from_pretrained(model_dir))
    return vision.encode_videos([pixels])[0]


def test_health_is_serving_after_warm_up(encoder):
    with grpc.insecure_channel(encoder.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pllava.v1.Encoder"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == SERVING
    log = encoder.log_text()
    assert (log.index("listening on 127.0.0.1:") < log.index("vision encoder ready") < log.index("startup heap frozen")
            < log.index("SERVING"))


def test_reflection_lists_the_services(encoder):
    with grpc.insecure_channel(encoder.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {"pllava.v1.Encoder", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_encode_over_grpc_equals_in_process(stub, tiny_model_dir, videos_dir):
    video = videos_dir / "orbit.mp4"
    header, tokens = encode(stub, video.read_bytes(), 0, request_id="parity-1", video_name="orbit.mp4")
    expected = in_process_tokens(tiny_model_dir, video)
    assert header.visual_tokens.dtype == pllava_pb2.DTYPE_FLOAT32
    assert list(header.visual_tokens.shape) == [576, 64] and tokens.shape == expected.shape
    np.testing.assert_allclose(tokens, expected, rtol=0, atol=1e-5)
    assert header.num_frames == 4  # num_frames 0 = the checkpoint's default
    assert header.model_id == model_id(tiny_model_dir, 4.0)
    t = header.timings
    assert t.video_decode_ms > 0 and t.encode_ms > 0 and t.total_ms >= t.encode_ms


def test_encode_with_more_frames_over_grpc(stub, tiny_model_dir, videos_dir):
    video = videos_dir / "portrait.mp4"
    header, tokens = encode(stub, video.read_bytes(), 8)
    np.testing.assert_allclose(tokens, in_process_tokens(tiny_model_dir, video, 8), rtol=0, atol=1e-5)
    assert header.num_frames == 8


def test_get_info(stub, tiny_model_dir):
    info = stub.GetInfo(pllava_pb2.GetInfoRequest(), timeout=10)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert info.role == pllava_pb2.SERVER_ROLE_ENCODER
    assert info.model_id == model_id(tiny_model_dir, 4.0)
    assert info.model_path == str(tiny_model_dir) and info.model_type == config["model_type"]
    assert info.dtype == pllava_pb2.DTYPE_FLOAT32 and info.device == "CPU"
    assert info.num_frames == 4 and list(info.pooling_shape) == [4, 12, 12] and info.num_visual_tokens == 576
    assert info.vision_hidden_size == config["vision_config"]["hidden_size"] == 32
    assert info.text_hidden_size == config["text_config"]["hidden_size"] == 64
    assert info.max_batch == 64 // 4 and info.max_queue == 32 and info.version


def bad_requests(videos_dir):
    orbit = (videos_dir / "orbit.mp4").read_bytes()
    return {
        "empty": (pllava_pb2.EncodeRequest(video=b"", video_name="empty.mp4"),
                  "empty.mp4: the input is empty (0 bytes)"),
        "random": (pllava_pb2.EncodeRequest(video=np.random.default_rng(0).bytes(8192), video_name="noise.bin"),
                   "noise.bin: not a recognised video or image format"),
        "truncated": (pllava_pb2.EncodeRequest(video=orbit[: len(orbit) // 2], video_name="half.mp4"),
                      "half.mp4: the file is truncated"),
        "text": (pllava_pb2.EncodeRequest(video=b"# notes\nnot a video at all\n" * 40, video_name="notes.txt"),
                 "notes.txt: this looks like a text file"),
        "huge num_frames": (pllava_pb2.EncodeRequest(video=orbit, num_frames=2**32 - 1),
                            "num_frames must be between 1 and 256 (0 = the model's default, 4), got 4294967295"),
        "257 frames": (pllava_pb2.EncodeRequest(video=orbit, num_frames=257),
                       "num_frames must be between 1 and 256"),
        "audio only": (pllava_pb2.EncodeRequest(video=odd_media.audio_only(), video_name="talk.m4a"),
                       "talk.m4a: the file has no video stream (it holds only audio)"),
        "1x1 video": (pllava_pb2.EncodeRequest(video=odd_media.tiny_video(1, 1), video_name="dot.mp4"),
                      "dot.mp4: the video is only 1x1 pixels, too small"),
        "video bomb": (pllava_pb2.EncodeRequest(video=odd_media.mkv_declaring(10_000, 10_000), video_name="b.mkv"),
                       "b.mkv: the video's frames are 10000x10000 = 100,000,000 pixels, over the limit of "
                       "16,777,216 pixels per frame (max_frame_pixels)"),
        "image bomb": (pllava_pb2.EncodeRequest(video=odd_media.png_declaring(5000, 5000), video_name="b.png"),
                       "b.png: the image is 5000x5000 = 25,000,000 pixels, over the limit"),
        "thin video": (pllava_pb2.EncodeRequest(video=odd_media.tiny_video(130, 2), video_name="thin.mp4"),
                       "thin.mp4: the video's frames are 130x2 pixels, an aspect ratio of 65:1, over the limit of "
                       "10:1 (the preprocessing keeps the short side at 336 pixels: 21840x336 after resizing)"),
        "thin frames": (pllava_pb2.EncodeRequest(frames=pllava_pb2.Frames(images=[thin_png()] * 2), video_name="cam"),
                        "cam: the frames are 2048x1 pixels, an aspect ratio of 2048:1, over the limit of 10:1"),
        "corrupt tiff": (pllava_pb2.EncodeRequest(video=odd_media.tiff_with_rational_strip_offsets(),
                                                  video_name="scan.tif"),
                         "scan.tif: could not be read as an image; it may be corrupt or truncated (TypeError: "
                         "'IFDRational' object cannot be interpreted as an integer)"),
    }


def thin_png() -> bytes:
    """A 2048x1 PNG of 100 bytes; resized to a short side of 336 it would be 688128x336."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 2048, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", ["empty", "random", "truncated", "text", "huge num_frames", "257 frames",
                                  "audio only", "1x1 video", "video bomb", "image bomb", "thin video",
                                  "thin frames", "corrupt tiff"])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(stub, encoder, videos_dir, case):
    request, message = bad_requests(videos_dir)[case]
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Encode(request, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    header, tokens = encode(stub, (videos_dir / "portrait.mp4").read_bytes())
    assert tokens.shape == (576, 64) and header.num_frames == 4


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_negative_num_frames_from_a_raw_client_is_invalid_argument(encoder, videos_dir):
    """num_frames is uint32, so the Python stubs cannot even send -1; a client in another
    language can (-1 as a 64-bit varint, which the server reads as 2**32 - 1)."""
    body = pllava_pb2.EncodeRequest(video=(videos_dir / "orbit.mp4").read_bytes()).SerializeToString()
    raw = body + bytes([2 << 3 | 0]) + varint(2**64 - 1)  # field 2 (num_frames), varint -1
    with grpc.insecure_channel(encoder.address, options=channel_options()) as channel:
        call = channel.unary_stream("/pllava.v1.Encoder/Encode", request_serializer=lambda b: b,
                                    response_deserializer=pllava_pb2.EncodeResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            list(call(raw, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_frames must be between 1 and 256" in err.value.details()


def test_random_requests_are_encoded_or_refused_and_never_break_the_server(encoder, stub, videos_dir):
    """Hostile input at random (a fixed, reproducible set of 120, tests/hostile_requests.py):
    every Encode is either taken (its header streams) or refused with INVALID_ARGUMENT and a
    message; afterwards a plain encode gives the same tokens as before and the log holds no
    traceback."""
    import hostile_requests

    short = (videos_dir / "short.mp4").read_bytes()
    before = encode(stub, short)[1]
    outcomes = hostile_requests.tally(hostile_requests.encode_requests(), lambda request: (
        hostile_requests.answer_or_refusal(stub.Encode(request, timeout=60))))
    assert outcomes.get("taken", 0) >= 5 and outcomes.get("refused", 0) >= 50, outcomes
    np.testing.assert_array_equal(encode(stub, short)[1], before)
    assert encoder.alive() and "Traceback" not in encoder.log_text(), encoder.log_tail()


def test_operator_limits_frame_pixels_decode_time_and_concurrent_rpcs(tiny_model_dir, videos_dir, tmp_path):
    """--max-frame-pixels 60000 refuses portrait.mp4 (190x338 = 64,220 pixels a frame) from
    its header; --decode-timeout-s 2 stops 256 frames of orbit.mp4 (322x182; 15 s of
    decoding or more here) with DEADLINE_EXCEEDED and replaces that worker; short.mp4
    (250x142) encodes before, meanwhile and after. --max-concurrent-rpcs 3: with three
    health watches held open, a fourth call is refused with RESOURCE_EXHAUSTED (the client
    names the setting); one watch closed, calls go through again."""
    with start_encoder(tiny_model_dir, log_dir=tmp_path, extra_args=[
            "--max-frame-pixels", "60000", "--decode-timeout-s", "2", "--video-workers", "2",
            "--max-concurrent-rpcs", "3"]) as server, \
            grpc.insecure_channel(server.address, options=channel_options()) as channel:
        stub = pllava_pb2_grpc.EncoderStub(channel)
        short = (videos_dir / "short.mp4").read_bytes()
        _, expected = encode(stub, short)
        with pytest.raises(grpc.RpcError) as err:
            encode(stub, (videos_dir / "portrait.mp4").read_bytes(), video_name="portrait.mp4")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "portrait.mp4: the video's frames are 190x338 = 64,220 pixels, over the limit of 60,000" \
            in err.value.details()

        with ThreadPoolExecutor(1) as pool:  # Encode streams its answer: the long one runs on a thread
            overrun = pool.submit(encode, stub, (videos_dir / "orbit.mp4").read_bytes(), 256,
                                  video_name="long.mp4")
            meanwhile = encode(stub, short)[1]
            with pytest.raises(grpc.RpcError) as err:
                overrun.result(timeout=120)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert err.value.details().startswith("long.mp4: decoding took longer than this encoder's budget of 2 s "
                                              "per video (decode_timeout_s)")
        server.wait_for_log(r"replacing video worker video-worker-\d+ \(pid \d+\): it overran the 2 s budget "
                            r"on long\.mp4")
        np.testing.assert_array_equal(meanwhile, expected)
        np.testing.assert_array_equal(encode(stub, short)[1], expected)

        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(3)]
        assert [next(w).status for w in watches] == [SERVING] * 3
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInfo(pllava_pb2.GetInfoRequest(), timeout=30)
        refused = CaptionError.from_rpc_error(err.value)
        assert refused.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_rpcs" in refused.message
        watches.pop().cancel()  # the server hears of it a moment later
        assert _eventually(lambda: stub.GetInfo(pllava_pb2.GetInfoRequest(), timeout=30)).model_id
        for watch in watches:
            watch.cancel()
        assert server.alive()


def _eventually(call, timeout_s: float = 30.0):
    """``call()``, tried again while it is refused with RESOURCE_EXHAUSTED."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_sigterm_drains_an_in_flight_encode(tiny_model_dir, videos_dir, tmp_path):
    """SIGTERM: health turns NOT_SERVING, new requests get UNAVAILABLE, and a stream already
    running still completes before the process exits.

    To hold an Encode in flight without relying on timing, its response is made far larger
    than the client's HTTP/2 flow-control window (a copy of the tiny checkpoint pooled to
    16x24x24 = 9216 tokens, 2.4 MB) and the client stops reading after the header: the
    server cannot finish the stream until the client reads on."""
    model = tmp_path / "tiny-16x24x24"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "config.json":
            (model / f.name).symlink_to(f)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.update(num_frames=16, pooling_shape=[16, 24, 24])
    (model / "config.json").write_text(json.dumps(config))
    orbit = (videos_dir / "orbit.mp4").read_bytes()
    expected = in_process_tokens(model, videos_dir / "orbit.mp4")
    assert expected.nbytes > 2_000_000

    # No BDP probing: the window stays at its initial 64 KiB instead of growing to the tensor.
    slow_reader = channel_options() + [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]
    server = start_encoder(model, log_dir=tmp_path)
    try:
        with grpc.insecure_channel(server.address, options=slow_reader) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == SERVING
            stub = pllava_pb2_grpc.EncoderStub(channel)
            responses = stub.Encode(pllava_pb2.EncodeRequest(video=orbit, request_id="in-flight"), timeout=120)
            header = next(responses)  # ... and read nothing more for now
            assert header.header.visual_tokens.nbytes == expected.nbytes

            server.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
            draining = server.wait_for_log(r"draining: .*, (\d+) in flight")
            assert draining.group(1) == "1"
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Encode(pllava_pb2.EncodeRequest(video=orbit), timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
            assert server.alive()

            assembler = TensorAssembler(header.header.visual_tokens)
            for response in responses:
                assembler.add(response.chunk)
            np.testing.assert_allclose(assembler.finish(), expected, rtol=0, atol=1e-5)
        assert server.wait(60) == 0, server.log_tail()
        log = server.log_text()
        assert re.search(r"SIGTERM received", log) and "stopped" in log
        assert "still running" not in log  # the in-flight stream finished, nothing was cancelled
    finally:
        server.kill()


def test_a_folder_without_a_checkpoint_is_one_clear_error(tmp_path):
    """The folder is read after the port is bound: the server it started is stopped before the
    error is reported (it used to end in 'Event loop is closed' tracebacks at exit)."""
    import subprocess

    from servers import console_script

    run = subprocess.run([console_script("pllava-encoder"), "--model", str(tmp_path), "--host", "127.0.0.1",
                          "--port", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"{tmp_path}/config.json does not exist" in run.stderr
    assert "Traceback" not in run.stderr and "never awaited" not in run.stderr, run.stderr
