"""The thin client (``pllava_client.Client``) and ``pllava-caption``.

Two tiers: a scripted in-process ``Decoder`` servicer pins down what the client does with a
stream (pieces, token ids, the final event, errors, cancellation, the request it sends);
then real encoder and decoder servers in subprocesses on the tiny checkpoint, whose
streamed tokens must equal in-process greedy generation token for token.
"""
from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from pllava_client import CaptionError, CaptionResult, Client, RequestTooLarge
from pllava_client.channel import server_options, stays_on_this_machine
from pllava_client.retry import CaptionRetry
from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc
from servers import console_script, free_ports, start_decoder, start_encoder, start_server, wait_until

PROMPT = "What is happening in this video?"
MAX_NEW_TOKENS = 24

# ---------------------------------------------------------------------------------------
# A scripted decoder
# ---------------------------------------------------------------------------------------


def token(text: str, *ids: int) -> pllava_pb2.CaptionEvent:
    return pllava_pb2.CaptionEvent(token=pllava_pb2.TokenEvent(text=text, token_ids=list(ids)))


def final(**fields) -> pllava_pb2.CaptionEvent:
    return pllava_pb2.CaptionEvent(final=pllava_pb2.FinalEvent(**fields))


class ScriptedDecoder(pllava_pb2_grpc.DecoderServicer):
    """Answers Caption with ``self.events`` (then aborts with ``self.abort`` if set); with
    ``self.endless`` it streams until the client goes away and records that it did."""

    def __init__(self):
        self.events: list[pllava_pb2.CaptionEvent] = []
        self.abort: tuple[grpc.StatusCode, str] | None = None
        self.endless = False
        self.requests: list[pllava_pb2.CaptionRequest] = []
        self.client_gone = threading.Event()
        #: the first this many calls are refused with UNAVAILABLE (a decoder still loading) ...
        self.unavailable_first = 0
        #: ... carrying this ``grpc-retry-pushback-ms`` if set
        self.pushback_ms: str | None = None

    def Caption(self, request, context):
        self.requests.append(request)
        if len(self.requests) <= self.unavailable_first:
            if self.pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", self.pushback_ms),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "the decoder is still loading")
        if self.endless:
            context.add_callback(self.client_gone.set)
            i = 0
            while context.is_active():
                i += 1
                yield token(f"w{i} ", i)
            return
        yield from self.events
        if self.abort is not None:
            context.abort(*self.abort)

    def GetInfo(self, request, context):
        return pllava_pb2.ModelInfo(model_id="scripted", role=pllava_pb2.SERVER_ROLE_DECODER,
                                    templates=["plain"])


@pytest.fixture
def scripted():
    servicer = ScriptedDecoder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=server_options())
    pllava_pb2_grpc.add_DecoderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # No default deadline: a call that is not cancelled would run until the server stops.
    with Client(f"127.0.0.1:{port}") as client:
        yield servicer, client
    server.stop(None)


def test_stream_yields_text_and_keeps_the_final_event(scripted):
    servicer, client = scripted
    servicer.events = [
        token("A", 5), token("", 6), token("\u00e9 b", 7, 8),
        final(finish_reason=pllava_pb2.FINISH_REASON_STOP_STRING, caption="A\u00e9 b",
              prompt="USER: <image> hi", prompt_token_ids=[1, 2, 3], token_ids=[5, 6, 7, 8],
              num_visual_tokens=576, num_frames=4, stop_string="!", model_id="m",
              timings=pllava_pb2.Timings(prefill_ms=2.5, total_ms=9.0)),
    ]
    stream = client.caption(b"video", PROMPT)
    assert stream.result is None
    assert list(stream) == ["A", "\u00e9 b"]           # the empty piece is not yielded ...
    assert stream.token_ids == [5, 6, 7, 8]             # ... but its token id counts
    assert stream.text == "A\u00e9 b"
    result = stream.result
    assert isinstance(result, CaptionResult)
    assert result.finish_reason == "stop_string" and result.stop_string == "!"
    assert result.token_ids == [5, 6, 7, 8] and result.prompt_token_ids == [1, 2, 3]
    assert result.timings["prefill_ms"] == 2.5 and result.timings["total_ms"] == 9.0
    assert set(result.to_json()) == {"caption", "prompt", "prompt_token_ids", "token_ids",
                                     "num_visual_tokens", "num_frames", "finish_reason", "timings"}
    assert json.loads(json.dumps(result.to_json()))["caption"] == "A\u00e9 b"


def test_caption_full_returns_the_result(scripted):
    servicer, client = scripted
    servicer.events = [token("x", 3), final(finish_reason=pllava_pb2.FINISH_REASON_LENGTH,
                                            caption="x", token_ids=[3])]
    result = client.caption_full(b"video")
    assert result.caption == "x" and result.finish_reason == "length"


def test_request_carries_video_prompt_and_only_the_sampling_fields_given(scripted, tmp_path):
    servicer, client = scripted
    servicer.events = [final(finish_reason=pllava_pb2.FINISH_REASON_STOP)]
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00mp4 bytes")

    client.caption_full(path, PROMPT, template="plain", num_frames=8, max_new_tokens=5,
                        temperature=0.0, top_k=3, seed=7, stop=["\n"], request_id="r1")
    client.caption_full(str(path))
    with open(path, "rb") as f:
        client.caption_full(f)
    client.caption_full(io.BytesIO(b"\x00mp4 bytes"))
    client.caption_full(bytearray(b"\x00mp4 bytes"))

    first, *others = servicer.requests
    assert first.video == b"\x00mp4 bytes" and first.video_name == "clip.mp4"
    assert (first.prompt, first.template, first.num_frames, first.request_id) == (PROMPT, "plain", 8, "r1")
    s = first.sampling
    assert s.max_new_tokens == 5 and list(s.stop) == ["\n"]
    assert s.HasField("temperature") and s.temperature == 0.0     # 0 is sent, not "unset"
    assert s.top_k == 3 and s.seed == 7
    assert not s.HasField("top_p") and not s.HasField("repetition_penalty")
    for request in others:                                            # every form of video
        assert request.video == b"\x00mp4 bytes"
        assert request.prompt == "" and request.template == ""        # server defaults
        assert not request.sampling.HasField("temperature")
    assert [r.video_name for r in others] == ["clip.mp4", "clip.mp4", "", ""]


def test_bad_video_arguments_fail_before_any_call(scripted, tmp_path):
    servicer, client = scripted
    with pytest.raises(FileNotFoundError):
        client.caption(tmp_path / "missing.mp4")
    (tmp_path / "t.txt").write_text("text")
    with open(tmp_path / "t.txt") as text_mode, pytest.raises(TypeError, match="'rb'"):
        client.caption(text_mode)
    with pytest.raises(TypeError, match="path, bytes or a binary file"):
        client.caption(12345)
    with pytest.raises(RequestTooLarge, match="at most"):
        client.caption(bytes(64 << 20))
    # a small video with a prompt that makes the request too large for one message
    with pytest.raises(RequestTooLarge, match=r"the request is \d+ bytes with its prompt and other fields"):
        client.caption(b"video", "describe " * (8 << 20))
    assert servicer.requests == []


def test_request_carries_frames_in_order_instead_of_a_video(scripted, tmp_path):
    servicer, client = scripted
    servicer.events = [final(finish_reason=pllava_pb2.FINISH_REASON_STOP)]
    folder = tmp_path / "clip42"
    folder.mkdir()
    (folder / "f1.png").write_bytes(b"\x89PNG one")
    (folder / "f2.jpg").write_bytes(b"\xff\xd8\xff two")
    with open(folder / "f2.jpg", "rb") as f:
        client.caption_full(frames=[folder / "f1.png", f, b"three"], prompt=PROMPT, num_frames=8)
    client.caption_full(frames=(b"a", bytearray(b"b")), video_name="cam-3")

    first, second = servicer.requests
    assert first.WhichOneof("input") == "frames" and first.video == b""
    assert list(first.frames.images) == [b"\x89PNG one", b"\xff\xd8\xff two", b"three"]
    assert (first.video_name, first.prompt, first.num_frames) == ("clip42", PROMPT, 8)
    assert list(second.frames.images) == [b"a", b"b"] and second.video_name == "cam-3"


def test_bad_frames_arguments_fail_before_any_call(scripted, tmp_path):
    servicer, client = scripted
    with pytest.raises(TypeError, match="either a video or frames=.*not both"):
        client.caption(b"video", frames=[b"frame"])
    with pytest.raises(TypeError, match="got neither"):
        client.caption(None, PROMPT)
    with pytest.raises(TypeError, match="frames is a list of images"):
        client.caption(frames=str(tmp_path))
    with pytest.raises(ValueError, match="frames is empty"):
        client.caption(frames=[])
    with pytest.raises(FileNotFoundError):
        client.caption(frames=[tmp_path / "missing.png"])
    with pytest.raises(ValueError, match=r"the 2 frames are \d+ bytes; one request carries at most"):
        client.caption(frames=[bytes(40 << 20), bytes(30 << 20)])
    assert servicer.requests == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=-3), "top_k must be an integer from 0 to 4294967295, got -3"),
    (dict(num_frames=-1), "num_frames must be an integer from 0 to 4294967295, got -1"),
    (dict(max_new_tokens=2**32), "max_new_tokens must be an integer from 0 to 4294967295, got 4294967296"),
    (dict(seed=-7), "seed must be an integer from 0 to 18446744073709551615, got -7"),
    (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
    (dict(stop="END"), "stop must be a list of strings, got the string 'END'"),
    (dict(temperature=1e39),
     "temperature must be a number a 32-bit float holds: 0, or about 1e-45 to 3e38 in size; got 1e+39"),
    (dict(top_p=1e-46), "top_p must be a number a 32-bit float holds: 0, or about 1e-45 to 3e38 in size; got 1e-46"),
])
def test_arguments_a_request_cannot_carry_name_their_field(scripted, kwargs, message):
    """Protobuf alone would say ``Value out of range: -3``, naming nothing."""
    servicer, client = scripted
    with pytest.raises(ValueError) as err:
        client.caption(b"video", **kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError, match=message.split(",")[0]):
        client.caption(frames=[b"\x89PNG frame"], **kwargs)
    with pytest.raises(ValueError, match=message.split(",")[0]):  # checked before any video is read
        client.caption_many(["/nowhere/at/all.mp4"], concurrency=1, **kwargs)
    assert servicer.requests == []


def test_server_refusal_is_a_caption_error_with_status_and_message(scripted):
    servicer, client = scripted
    servicer.events = [token("partial", 1)]
    servicer.abort = (grpc.StatusCode.INVALID_ARGUMENT, "clip.mp4: not a video")
    stream = client.caption(b"junk")
    assert next(stream) == "partial"
    with pytest.raises(CaptionError) as info:
        next(stream)
    err = info.value
    assert err.status is grpc.StatusCode.INVALID_ARGUMENT and err.code() is err.status
    assert err.message == err.details() == "clip.mp4: not a video"
    assert str(err) == "INVALID_ARGUMENT: clip.mp4: not a video"
    assert isinstance(err, grpc.RpcError)
    assert stream.result is None and stream.token_ids == [1]


def test_stream_without_final_event_is_an_error(scripted):
    servicer, client = scripted
    servicer.events = [token("a", 1)]
    with pytest.raises(CaptionError, match="without a final event"):
        client.caption_full(b"v")


def test_deadline_and_unreachable_server():
    with Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(CaptionError) as info:
            client.caption_full(b"v")
        assert info.value.status is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(CaptionError) as info:
            client.info()
        assert info.value.status is grpc.StatusCode.UNAVAILABLE


def test_deadline_exceeded(scripted):
    servicer, client = scripted
    servicer.endless = True
    with pytest.raises(CaptionError) as info:
        client.caption_full(b"v", timeout=0.5)
    assert info.value.status is grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer.client_gone.wait(30)


def test_close_cancels_the_call(scripted):
    servicer, client = scripted
    servicer.endless = True
    stream = client.caption(b"v")
    assert next(stream) == "w1 "
    stream.close()
    assert servicer.client_gone.wait(30), "the server never saw the call end"
    assert list(stream) == []                           # a closed stream yields nothing more


def test_with_block_cancels_the_call(scripted):
    servicer, client = scripted
    servicer.endless = True
    with client.caption(b"v") as stream:
        next(stream)
    assert servicer.client_gone.wait(30)


def test_breaking_out_of_a_for_loop_cancels_the_call(scripted):
    servicer, client = scripted
    servicer.endless = True
    for i, _ in enumerate(client.caption(b"v")):
        if i == 2:
            break
    gc.collect()  # CPython drops the stream at once; collect for other implementations
    assert servicer.client_gone.wait(30)


@pytest.mark.parametrize("pushback_ms", [None, "50"])
def test_a_caption_refused_before_its_first_token_is_made_again(scripted, pushback_ms):
    servicer, client = scripted
    servicer.unavailable_first, servicer.pushback_ms = 2, pushback_ms
    servicer.events = [token("a", 1), final(caption="a", token_ids=[1])]
    assert client.caption_full(b"v").token_ids == [1]
    assert len(servicer.requests) == 3


@pytest.mark.parametrize("pushback_ms, attempts", [(None, 5), ("-1", 1), ("soon", 1)])
def test_retries_end_after_five_attempts_or_when_the_decoder_says_so(scripted, pushback_ms, attempts):
    servicer, client = scripted
    servicer.unavailable_first, servicer.pushback_ms = 100, pushback_ms
    with pytest.raises(CaptionError) as info:
        client.caption_full(b"v")
    assert info.value.status is grpc.StatusCode.UNAVAILABLE
    assert "still loading" in info.value.message
    assert len(servicer.requests) == attempts


def test_no_retry_after_a_token_nor_when_the_client_says_so(scripted):
    servicer, client = scripted
    servicer.events = [token("a", 1)]
    servicer.abort = (grpc.StatusCode.UNAVAILABLE, "the decoder is shutting down")
    with pytest.raises(CaptionError, match="shutting down"):
        client.caption_full(b"v")
    assert len(servicer.requests) == 1
    servicer.abort, servicer.unavailable_first = None, 2
    with Client(client.address, retry_unavailable=False) as once, pytest.raises(CaptionError, match="still loading"):
        once.caption_full(b"v")
    assert len(servicer.requests) == 2


def read_in_background(stream) -> tuple[threading.Thread, list]:
    """A daemon thread reading ``stream`` to its end (a hung one must not hold pytest); the
    list gets the exception it ended with, or None."""
    ended: list = []

    def read():
        try:
            list(stream)
            ended.append(None)
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            ended.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, ended


@pytest.mark.parametrize("closing", ["stream", "client"])
def test_no_retry_past_the_deadline_nor_after_close(scripted, closing):
    """A pause that would end past the call's deadline is not waited out; closing the stream,
    or its client, during a pause ends the stream with CANCELLED and no other call."""
    servicer, client = scripted
    servicer.unavailable_first, servicer.pushback_ms = 100, "60000"
    with pytest.raises(CaptionError, match="still loading"):
        client.caption_full(b"v", timeout=30)
    assert len(servicer.requests) == 1
    stream = client.caption(b"v")
    reader, ended = read_in_background(stream)
    wait_until(lambda: len(servicer.requests) >= 2, 30, "the decoder never got the second call")
    time.sleep(0.5)  # the refusal has reached the client, which now pauses for a minute
    (stream if closing == "stream" else client).close()
    reader.join(30)
    assert not reader.is_alive(), "close() did not end the pause"
    assert isinstance(ended[0], CaptionError) and ended[0].status is grpc.StatusCode.CANCELLED, ended
    assert "waited to try the decoder again" in ended[0].message
    assert len(servicer.requests) == 2


def test_retry_pauses():
    retry = CaptionRetry()
    unavailable = grpc.StatusCode.UNAVAILABLE
    for failed in range(1, 5):
        pauses = [retry.pause_s(failed, unavailable, None) for _ in range(200)]
        assert 0 <= min(pauses) and max(pauses) <= min(1.6, 0.2 * 2 ** (failed - 1))
        assert max(pauses) > 0.5 * min(1.6, 0.2 * 2 ** (failed - 1))  # random below the cap, not fixed
    assert retry.pause_s(5, unavailable, None) is None  # five attempts made
    assert retry.pause_s(1, grpc.StatusCode.INTERNAL, None) is None
    assert retry.pause_s(1, unavailable, [("request-id", "r"), ("grpc-retry-pushback-ms", "2500")]) == 2.5
    assert retry.pause_s(1, unavailable, [("grpc-retry-pushback-ms", "-1")]) is None
    assert retry.pause_s(1, unavailable, [("grpc-retry-pushback-ms", "soon")]) is None


@pytest.mark.parametrize("address, local", [
    ("127.0.0.1:50052", True), ("localhost:50052", True), ("[::1]:50052", True), ("127.0.0.2:1,127.0.0.3:2", True),
    ("dns:///localhost:50052", True), ("ipv4:127.0.0.1:1,127.0.0.1:2", True), ("unix:/run/pllava.sock", True),
    ("decoder:50052", False), ("10.0.0.5:50052", False), ("127.0.0.1:1,10.0.0.5:2", False),
    ("dns:///decoders:50052", False), ("dns://8.8.8.8/localhost:50052", True), ("xds:///decoder", False)])
def test_a_token_in_plaintext_off_this_machine_is_warned_about(address, local, caplog):
    assert stays_on_this_machine(address) is local
    caplog.set_level("WARNING", logger="pllava_client")
    for kwargs in ({"token": "t0k3n"}, {}):
        caplog.clear()
        Client(address, **kwargs).close()
        warned = [r.getMessage() for r in caplog.records]
        if kwargs and not local:
            assert warned == [f"the token goes to {address} in plaintext, readable on the way; connect over TLS "
                              "(tls_ca, --tls-ca)"], warned
        else:
            assert warned == []


def test_info(scripted):
    _, client = scripted
    info = client.info()
    assert info.model_id == "scripted" and info.role == pllava_pb2.SERVER_ROLE_DECODER


# ---------------------------------------------------------------------------------------
# Real servers on the tiny checkpoint
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    """One encoder and one decoder server, as ``pllava-encoder`` / ``pllava-decoder``."""
    logs = tmp_path_factory.mktemp("client-servers")
    with start_encoder(tiny_model_dir, log_dir=logs) as encoder:
        argv = [console_script("pllava-decoder"), "--model", str(tiny_model_dir), "--host",
                "127.0.0.1", "--port", "0", "--encoder", encoder.address]
        with start_server(argv, name="decoder", log_dir=logs) as decoder:
            yield decoder.address


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, videos_dir):
    """``pllava caption --json`` results of both videos: in-process greedy generation."""
    from pllava.pipeline import Captioner, CaptionResult as InProcessResult
    from pllava.sampling import SamplingParams

    captioner = Captioner(tiny_model_dir)
    out = {}
    for name in ("orbit.mp4", "portrait.mp4"):
        result = InProcessResult()
        for _ in captioner.caption(videos_dir / name, PROMPT, params=SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
                                   result=result):
            pass
        out[name] = result.to_json()
    return out


def caption_cli(*args, timeout=120):
    return subprocess.run([console_script("pllava-caption"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_streamed_tokens_equal_in_process_generation(stack, in_process, videos_dir):
    with Client(stack, timeout=120) as client:
        for name in ("orbit.mp4", "portrait.mp4"):
            expected = in_process[name]
            stream = client.caption(videos_dir / name, PROMPT, max_new_tokens=MAX_NEW_TOKENS)
            pieces = list(stream)
            assert stream.token_ids == expected["token_ids"], name
            assert "".join(pieces) == stream.result.caption == expected["caption"]
            got = stream.result.to_json()
            for key in ("prompt", "prompt_token_ids", "token_ids", "num_visual_tokens",
                        "num_frames", "finish_reason"):
                assert got[key] == expected[key], (name, key)
            assert len(expected["token_ids"]) > 0


def test_bytes_and_file_objects_caption_like_paths(stack, in_process, videos_dir):
    path = videos_dir / "portrait.mp4"
    expected = in_process["portrait.mp4"]["token_ids"]
    with Client(stack, timeout=120) as client:
        assert client.caption_full(path.read_bytes(), PROMPT, max_new_tokens=MAX_NEW_TOKENS).token_ids == expected
        with open(path, "rb") as f:
            assert client.caption_full(f, PROMPT, max_new_tokens=MAX_NEW_TOKENS).token_ids == expected
        info = client.info()
        assert info.role == pllava_pb2.SERVER_ROLE_DECODER and info.model_id


def test_cli_json_matches_the_in_process_json(stack, in_process, videos_dir):
    done = caption_cli(videos_dir / "orbit.mp4", "--server", stack, "--prompt", PROMPT,
                       "--max-new-tokens", MAX_NEW_TOKENS, "--json", "--timeout", 120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    expected = in_process["orbit.mp4"]
    assert set(got) == set(expected)
    assert got["token_ids"] == expected["token_ids"] and got["caption"] == expected["caption"]
    assert set(expected["timings"]) <= set(got["timings"])


def test_cli_streams_the_caption(stack, in_process, videos_dir):
    done = caption_cli(videos_dir / "orbit.mp4", "--server", stack, "--prompt", PROMPT,
                       "--max-new-tokens", MAX_NEW_TOKENS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == in_process["orbit.mp4"]["caption"] + "\n"


@pytest.mark.parametrize("content", [b"", b"this is a text file, not a video\n", b"\x00\x00\x00\x18ftypmp42" + bytes(64)],
                         ids=["empty", "text", "truncated-mp4"])
def test_cli_refused_request_exits_nonzero_with_the_status(stack, tmp_path, content):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    done = caption_cli(bad, "--server", stack, "--timeout", 60)
    assert done.returncode == 1
    assert done.stderr.startswith("error: INVALID_ARGUMENT: "), done.stderr
    assert "bad.mp4" in done.stderr                       # the message names the video
    assert done.stdout == ""


def test_cli_unreachable_server_and_missing_file(tmp_path, videos_dir):
    done = caption_cli(videos_dir / "portrait.mp4", "--server", "127.0.0.1:1", "--timeout", 10)
    assert done.returncode == 1 and done.stderr.startswith("error: UNAVAILABLE: ")
    done = caption_cli(tmp_path / "missing.mp4", "--server", "127.0.0.1:1")
    assert done.returncode == 2 and "missing.mp4" in done.stderr


@pytest.mark.parametrize("args, message", [
    (("--top-k", "-3"), "error: top_k must be an integer from 0 to 4294967295, got -3"),
    (("--seed", "-1"), "error: seed must be an integer from 0 to 18446744073709551615, got -1"),
    (("--top-k", "-3", "--out", "out.jsonl"), "error: top_k must be an integer from 0 to 4294967295, got -3"),
])
def test_cli_names_an_option_the_request_cannot_carry(tmp_path, videos_dir, args, message):
    args = [str(tmp_path / a) if a == "out.jsonl" else a for a in args]
    done = caption_cli(videos_dir / "short.mp4", "--server", "127.0.0.1:1", *args)
    assert done.returncode == 2 and not (tmp_path / "out.jsonl").exists() and done.stderr.strip() == message, done.stderr


def test_cli_reads_the_video_from_stdin(stack, in_process, videos_dir):
    done = subprocess.run([console_script("pllava-caption"), "-", "--server", stack, "--prompt", PROMPT,
                           "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"],
                          input=(videos_dir / "portrait.mp4").read_bytes(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == in_process["portrait.mp4"]["token_ids"]


def test_client_module_imports_neither_mindspore_nor_pllava():
    code = ("import sys, pllava_client, pllava_client.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mindspore', 'pllava')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_decoder_killed_before_the_first_token_fails_the_caption_within_seconds(tiny_model_dir, tmp_path, videos_dir):
    """kill -9 of the only decoder while a caption waits there for an encoder (its address has
    none): the client tries the call again, finds no decoder and raises UNAVAILABLE within
    seconds. With gRPC's own retry policy the stream was seen waiting forever here, its
    deadline ignored."""
    nobody = f"127.0.0.1:{free_ports(1)}"
    with start_decoder(tiny_model_dir, nobody, tmp_path, "--encoder-ready-timeout-s", "300",
                       "--max-context", "1024") as decoder, \
            Client(decoder.address, timeout=120) as client:
        stream = client.caption(videos_dir / "still.jpg", max_new_tokens=4, request_id="doomed")
        reader, outcome = read_in_background(stream)
        decoder.wait_for_log(r"\[doomed\] waiting up to \d+ s for an encoder replica")
        os.kill(decoder.pid, signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive(), "the caption hung after its decoder was killed"
    assert len(outcome) == 1 and isinstance(outcome[0], CaptionError), outcome
    assert outcome[0].status is grpc.StatusCode.UNAVAILABLE, outcome[0]
    assert stream.token_ids == [] and stream.result is None
