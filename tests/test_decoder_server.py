"""The decoder server for real: encoder and decoder subprocesses on 127.0.0.1, the tiny
checkpoint, the public client.

Servers (module-scoped):
- ``decoder``: one encoder behind it, visual cache on, 8 slots, context 1024 (parity, cache,
  bad input);
- ``narrow``: the same encoder, ONE slot, context 4096 (cancel and deadline free the slot);
- ``pair``: two fresh encoders behind one static round-robin target, cache off (8 concurrent
  captions as the decoder's first calls, both replicas used, one replica killed mid-run).

Which replica served a request is read from the encoders' logs: the decoder forwards its
request id, and the encoder logs one ``[<request id>] ... visual tokens`` line per video it
encoded.
"""
from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from pllava.pipeline import Captioner, CaptionerSettings, CaptionResult as InProcessResult
from pllava.sampling import SamplingParams
from pllava_client.channel import channel_options
from pllava_client.client import CaptionError, Client
from pllava_proto.v1 import pllava_pb2
from servers import free_ports, scrape, start_decoder, start_encoder, value

import hostile_requests
import odd_media

CONTEXT = 1024


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decoder-server-logs")


@pytest.fixture(scope="module")
def encoder(tiny_model_dir, logs):
    with start_encoder(tiny_model_dir, log_dir=logs) as server:
        yield server


@pytest.fixture(scope="module")
def decoder(tiny_model_dir, encoder, logs):
    with start_decoder(tiny_model_dir, f"dns:///127.0.0.1:{encoder.port}", logs,
                       "--max-context", str(CONTEXT)) as server:
        yield server


@pytest.fixture(scope="module")
def narrow(tiny_model_dir, encoder, logs):
    with start_decoder(tiny_model_dir, f"dns:///127.0.0.1:{encoder.port}", logs,
                       "--max-batch", "1", "--max-context", "4096") as server:
        yield server


@pytest.fixture(scope="module")
def pair(tiny_model_dir, logs):
    metrics = free_ports(2)
    with start_encoder(tiny_model_dir, log_dir=logs, extra_args=["--metrics-port", str(metrics)]) as first, \
            start_encoder(tiny_model_dir, log_dir=logs, extra_args=["--metrics-port", str(metrics + 1)]) as second:
        first.metrics_port, second.metrics_port = metrics, metrics + 1
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"  # a static address list
        with start_decoder(tiny_model_dir, target, logs, "--max-context", str(CONTEXT),
                           "--visual-cache-bytes", "0") as dec:
            yield dec, first, second


@pytest.fixture(scope="module")
def captioner(tiny_model_dir) -> Captioner:
    return Captioner(tiny_model_dir, CaptionerSettings(max_context=CONTEXT))


@pytest.fixture(scope="module")
def media(videos_dir, tmp_path_factory) -> dict[str, Path]:
    """The two sample clips (samples/) and six distinct still images (PNG and JPEG)."""
    folder = tmp_path_factory.mktemp("media")
    files = {"orbit": videos_dir / "orbit.mp4", "portrait": videos_dir / "portrait.mp4"}
    for i in range(6):
        rng = np.random.default_rng(100 + i)
        pixels = (rng.random((180 + 20 * i, 320, 3)) * 255).astype(np.uint8)
        fmt = "PNG" if i % 2 else "JPEG"
        path = folder / f"still{i}.{fmt.lower()}"
        Image.fromarray(pixels).save(path, format=fmt)
        files[f"still{i}"] = path
    return files


def in_process(captioner: Captioner, video, prompt: str | None, max_new_tokens: int) -> InProcessResult:
    result = InProcessResult()
    for _ in captioner.caption(video, prompt, params=SamplingParams(max_new_tokens=max_new_tokens), result=result):
        pass
    return result


def encoded_ids(encoder) -> set[str]:
    """Request ids the encoder logged an encoded video for."""
    return set(re.findall(r"\[([^\]]+)\] .*-> \d+ visual tokens", encoder.log_text()))


# ---- one encoder, one decoder ------------------------------------------------------------------

@pytest.mark.parametrize("name, prompt", [("orbit", None), ("portrait", "What is the person doing?")])
def test_stream_equals_in_process_greedy(decoder, captioner, media, name, prompt):
    expected = in_process(captioner, media[name], prompt, 40)
    with Client(decoder.address, timeout=60) as client:
        stream = client.caption(media[name], prompt, max_new_tokens=40)
        pieces = list(stream)
    result = stream.result
    assert stream.token_ids == expected.token_ids  # token for token, as streamed
    assert result.token_ids == expected.token_ids and len(expected.token_ids) == 40
    assert "".join(pieces) == result.caption == expected.caption
    assert (result.prompt, result.prompt_token_ids) == (expected.prompt, expected.prompt_token_ids)
    assert (result.num_visual_tokens, result.num_frames) == (expected.num_visual_tokens, expected.num_frames) == (576, 4)
    assert result.finish_reason == expected.finish_reason == "length"
    assert result.to_json().keys() == expected.to_json().keys()
    assert set(expected.timings) <= set(result.timings)
    t = result.timings
    assert t["video_decode_ms"] > 0 and t["encode_ms"] > 0 and t["prefill_ms"] > 0 and t["decode_tokens_per_s"] > 0
    assert t["time_to_first_token_ms"] <= t["total_ms"]
    assert not result.visual_tokens_cached and result.model_id.startswith(Path(captioner.model_dir).name)


def test_stop_string_and_seeded_sampling_equal_in_process(decoder, captioner, media):
    reference = in_process(captioner, media["orbit"], None, 40).caption
    stop = reference[5:8]  # a piece of the greedy caption, so generation stops there
    params = SamplingParams(max_new_tokens=40, stop=(stop,))
    expected = InProcessResult()
    list(captioner.caption(media["orbit"], params=params, result=expected))
    sampled = SamplingParams(max_new_tokens=24, temperature=0.5, top_p=0.5, seed=7)  # exact in float32
    expected_sampled = InProcessResult()
    list(captioner.caption(media["portrait"], params=sampled, result=expected_sampled))
    with Client(decoder.address, timeout=60) as client:
        stopped = client.caption_full(media["orbit"], max_new_tokens=40, stop=[stop])
        drawn = client.caption_full(media["portrait"], max_new_tokens=24, temperature=0.5, top_p=0.5, seed=7)
    assert stopped.finish_reason == expected.finish_reason == "stop_string" and stopped.stop_string == stop
    assert (stopped.caption, stopped.token_ids) == (expected.caption, expected.token_ids)
    assert stop not in stopped.caption and reference.startswith(stopped.caption)
    assert drawn.token_ids == expected_sampled.token_ids


def test_get_info(decoder, encoder):
    with Client(decoder.address, timeout=30) as client:
        info = client.info()
    assert info.role == pllava_pb2.SERVER_ROLE_DECODER
    assert (info.max_batch, info.max_context, info.max_queue, info.num_visual_tokens) == (8, CONTEXT, 32, 576)
    assert info.templates[0] == "plain" and info.encoder_target == f"dns:///127.0.0.1:{encoder.port}"
    assert info.dtype == pllava_pb2.DTYPE_FLOAT32 and info.text_hidden_size == 64
    log = decoder.log_text()
    assert log.index("warmed up in") < log.index("startup heap frozen") < log.index("serving; encoders at")


def test_a_cold_compile_cache_is_compiled_by_a_child_then_loaded(tiny_model_dir, encoder, logs, captioner, media,
                                                                 tmp_path):
    """First start on an empty compile cache: a child process compiles every graph into it and
    the server loads them from there, never finding them stale (MindSpore warns and compiles
    again when the dependency files it hashes differ); its captions equal in-process greedy.
    A second start with the same setup finds the cache complete and starts no child."""
    cache = tmp_path / "compile"
    expected = in_process(captioner, media["orbit"], None, 12).token_ids
    for start in ("cold", "warm"):
        with start_decoder(tiny_model_dir, f"dns:///127.0.0.1:{encoder.port}", logs, "--max-context", str(CONTEXT),
                           "--compile-cache", str(cache)) as server:
            with Client(server.address, timeout=60) as client:
                assert client.caption_full(media["orbit"], max_new_tokens=12).token_ids == expected
            log = server.log_text()
        compiled_by_child = re.search(r"the child process compiled the graphs in [\d.]+ s", log)
        assert bool(compiled_by_child) == (start == "cold"), log[-3000:]
        assert "dependency files" not in log, f"the {start} start found the cached graphs stale:\n{log[-3000:]}"
    assert len(list(cache.glob("*/precompiled.json"))) == 1


def test_same_video_new_prompt_skips_the_encoder(decoder, encoder, captioner, media):
    with Client(decoder.address, timeout=60) as client:
        first = client.caption_full(media["still5"], "Describe the picture.", max_new_tokens=12, request_id="cache-1")
        second = client.caption_full(media["still5"], "What colours are there?", max_new_tokens=12,
                                     request_id="cache-2")
    assert not first.visual_tokens_cached and second.visual_tokens_cached
    seen = encoded_ids(encoder)
    assert "cache-1" in seen and "cache-2" not in seen  # the encoder never saw the second request
    assert second.timings["encode_ms"] == 0 and second.timings["transfer_ms"] == 0
    expected = in_process(captioner, media["still5"], "What colours are there?", 12)
    assert second.token_ids == expected.token_ids and second.num_frames == expected.num_frames == 1


@pytest.mark.parametrize("case, message", [
    ("empty video", "no video"),
    ("random bytes", "not a recognised video or image format"),
    ("truncated mp4", "truncated"),
    ("text file", "looks like a text file"),
    ("num_frames huge", "num_frames must be between 1 and"),
    ("prompt longer than the context", f"context holds {CONTEXT}"),
    ("top_p 0", r"invalid sampling parameters: top_p must be in \(0, 1\]"),
    ("negative temperature", "temperature must be >= 0"),
    ("NaN temperature", "invalid sampling parameters: temperature must be a finite number, got nan"),
    ("infinite temperature", "invalid sampling parameters: temperature must be a finite number, got inf"),
    ("NaN top_p", "invalid sampling parameters: top_p must be a finite number, got nan"),
    ("NaN repetition penalty", "invalid sampling parameters: repetition_penalty must be a finite number, got nan"),
    ("infinite repetition penalty", "repetition_penalty must be a finite number, got inf"),
    ("prompt over max_prompt_chars", r"the prompt is 16385 characters, more than this decoder accepts "
                                     r"\(max_prompt_chars=16384\)"),
    ("audio only", r"talk\.m4a: the file has no video stream \(it holds only audio\)"),
    ("1x1 video", r"dot\.mp4: the video is only 1x1 pixels, too small"),
    ("unknown template", "unknown prompt template 'chat'"),
    ("<image> in the prompt", "must not contain '<image>'"),
    ("17 stop strings", "invalid sampling parameters: at most 16 stop strings, got 17"),
    ("request_id not ASCII", "^request_id must be at most 128 printable ASCII characters without spaces; "
                             "got 4 characters: 'caf\xe9'$"),
    ("request_id of 20000 characters", "request_id must be .* got 20000 characters: 'x{200}'$"),
    ("video_name of 20000 characters", r"^x{160}\.\.\.x{37}: no video \(CaptionRequest\.video is empty\)$"),
    ("template name of 20000 characters", r"^unknown prompt template 't{100}.* \(\d{5} characters in all\)$"),
])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(decoder, media, case, message):
    orbit = media["orbit"].read_bytes()
    video, kwargs = orbit, {}
    if case == "empty video":
        video = b""
    elif case == "random bytes":
        video = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif case == "truncated mp4":
        video = orbit[:len(orbit) // 2]
    elif case == "text file":
        video = b"This is a shopping list, not a video.\nmilk\neggs\n" * 20
    elif case == "num_frames huge":
        kwargs = dict(num_frames=100_000)
    elif case == "prompt longer than the context":
        kwargs = dict(prompt="describe " * CONTEXT)
    elif case == "top_p 0":
        kwargs = dict(top_p=0.0)
    elif case == "negative temperature":
        kwargs = dict(temperature=-1.0)
    elif case == "NaN temperature":
        kwargs = dict(temperature=float("nan"))
    elif case == "infinite temperature":
        kwargs = dict(temperature=float("inf"))
    elif case == "NaN top_p":
        kwargs = dict(top_p=float("nan"))
    elif case == "NaN repetition penalty":
        kwargs = dict(repetition_penalty=float("nan"))
    elif case == "infinite repetition penalty":
        kwargs = dict(repetition_penalty=float("inf"))
    elif case == "prompt over max_prompt_chars":
        kwargs = dict(prompt="x" * 16385)
    elif case == "audio only":
        video, kwargs = odd_media.audio_only(), dict(video_name="talk.m4a")
    elif case == "1x1 video":
        video, kwargs = odd_media.tiny_video(1, 1), dict(video_name="dot.mp4")
    elif case == "unknown template":
        kwargs = dict(template="chat")
    elif case == "<image> in the prompt":
        kwargs = dict(prompt="Look at <image> again.")
    elif case == "17 stop strings":
        kwargs = dict(stop=[f"stop{i}" for i in range(17)])
    elif case == "request_id not ASCII":
        kwargs = dict(request_id="caf\xe9")
    elif case == "request_id of 20000 characters":
        kwargs = dict(request_id="x" * 20000)
    elif case == "video_name of 20000 characters":
        video, kwargs = b"", dict(video_name="x" * 20000)
    elif case == "template name of 20000 characters":
        kwargs = dict(template="t" * 20000)
    with Client(decoder.address, timeout=60) as client:
        with pytest.raises(CaptionError) as refused:
            client.caption_full(video, **{"max_new_tokens": 4, **kwargs})
        assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        assert re.search(message, refused.value.message), refused.value.message
        after = client.caption_full(media["still0"], max_new_tokens=2)  # still serving
    assert len(after.token_ids) == 2


def test_random_requests_are_answered_or_refused_and_never_break_the_server(decoder, media):
    """Hostile input at random (a fixed, reproducible set of 120): every request is either
    taken (its first event streams) or refused with INVALID_ARGUMENT and a message; never an
    internal error, a hang or a dead server; afterwards a plain caption still works and the
    log holds no traceback."""
    from pllava_proto.v1 import pllava_pb2_grpc

    with grpc.insecure_channel(decoder.address, options=channel_options()) as channel:
        stub = pllava_pb2_grpc.DecoderStub(channel)
        outcomes = hostile_requests.tally(hostile_requests.caption_requests(), lambda request: (
            hostile_requests.answer_or_refusal(stub.Caption(request, timeout=60))))
    assert outcomes.get("taken", 0) >= 5 and outcomes.get("refused", 0) >= 50, outcomes
    with Client(decoder.address, timeout=60) as client:
        assert len(client.caption_full(media["still0"], max_new_tokens=2).token_ids) == 2
    assert decoder.alive() and "Traceback" not in decoder.log_text(), decoder.log_tail()


#: long enough that the three steady captions outlast the refusals on a loaded machine (600
#: left a window of ~1 s after the last one started), within the 2048 context with the prompt
STEADY_TOKENS = 1000


def test_nan_temperature_is_refused_while_other_captions_keep_streaming(tiny_model_dir, encoder, logs, media):
    """Three captions are streaming; requests with NaN or infinite sampling parameters are
    refused at once with INVALID_ARGUMENT, and the three run to their full length. (Before,
    a NaN temperature passed validation and its sampling failed every caption in flight.)"""
    def caption(address, i):
        with Client(address, timeout=300) as client:
            stream = client.caption(media[f"still{i}"], max_new_tokens=STEADY_TOKENS, request_id=f"steady-{i}")
            next(stream)  # streaming now
            started[i].set()
            for _ in stream:
                pass
            return stream

    started = [threading.Event() for _ in range(3)]
    with start_decoder(tiny_model_dir, f"dns:///127.0.0.1:{encoder.port}", logs, "--max-context", "2048",
                       "--max-batch", "4") as dec, ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(caption, dec.address, i) for i in range(3)]
        for event in started:
            assert event.wait(120), dec.log_tail()
        with Client(dec.address, timeout=60) as client:
            for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")),
                        dict(repetition_penalty=float("nan"))):
                with pytest.raises(CaptionError) as refused:
                    client.caption_full(media["orbit"], max_new_tokens=400, **bad)
                assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
                assert f"{next(iter(bad))} must be a finite number" in refused.value.message
        assert not any(f.done() for f in futures), "a caption ended before the refusals: raise max_new_tokens"
        streams = [f.result(timeout=300) for f in futures]
    for stream in streams:
        assert stream.result.finish_reason == "length" and len(stream.token_ids) == STEADY_TOKENS


def test_operator_limits_on_video_bytes_and_prompt_characters(tiny_model_dir, encoder, logs, media, videos_dir):
    """--max-video-bytes 50000 refuses orbit.mp4 (102,748 bytes) before any encoder sees it;
    --max-prompt-chars 40 refuses a 41-character question; short.mp4 (19,950 bytes) with a
    short question is captioned."""
    with start_decoder(tiny_model_dir, f"dns:///127.0.0.1:{encoder.port}", logs, "--max-context", str(CONTEXT),
                       "--max-video-bytes", "50000", "--max-prompt-chars", "40") as dec, \
            Client(dec.address, timeout=60) as client:
        with pytest.raises(CaptionError) as refused:
            client.caption_full(media["orbit"], max_new_tokens=2, request_id="too-big")
        assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.message == ("orbit.mp4: the file is 102748 bytes, more than this decoder accepts "
                                         "(max_video_bytes=50000)")
        with pytest.raises(CaptionError) as refused:
            client.caption_full(videos_dir / "short.mp4", "x" * 41, max_new_tokens=2)
        assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
        assert "the prompt is 41 characters, more than this decoder accepts (max_prompt_chars=40)" \
            in refused.value.message
        with pytest.raises(CaptionError) as refused:
            client.caption_full(frames=[bytes(30_000), bytes(30_000)], video_name="cam", max_new_tokens=2)
        assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.message == ("cam: the 2 frames are 60000 bytes together, more than this decoder "
                                         "accepts (max_video_bytes=50000)")
        ok = client.caption_full(videos_dir / "short.mp4", "x" * 40, max_new_tokens=3, request_id="fits")
    assert len(ok.token_ids) == 3
    seen = encoded_ids(encoder)
    assert "fits" in seen and "too-big" not in seen


def test_a_video_past_the_encoders_message_limit_is_invalid_argument(tiny_model_dir, encoder, logs):
    """A decoder that takes larger videos than its encoders (max_video_bytes 100 MiB against
    their 64): gRPC's own refusal of the encoder's message (RESOURCE_EXHAUSTED, which clients
    retry as "busy") reaches the caller as INVALID_ARGUMENT saying which limit to change."""
    with start_decoder(tiny_model_dir, f"dns:///127.0.0.1:{encoder.port}", logs, "--max-context", str(CONTEXT),
                       "--max-video-bytes", str(100 << 20)) as dec, \
            Client(dec.address, timeout=120, options=channel_options(128 << 20)) as client:
        with pytest.raises(CaptionError) as refused:
            client.caption_full(bytes(70 << 20), video_name="big.mp4", max_new_tokens=2)
        assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        assert "the video is larger than the encoders at" in refused.value.message
        assert "max_video_bytes is below this decoder's" in refused.value.message
        assert len(client.caption_full(bytes(odd_media.tiny_video(64, 48)), max_new_tokens=2).token_ids) == 2


# ---- one slot: cancellation and deadlines free it ----------------------------------------------

def slot_freed(server, request_id: str) -> int:
    """Generated tokens of ``request_id`` when the engine cancelled it and freed its slot."""
    pattern = rf"{re.escape(request_id)}#\d+ cancelled after (\d+) generated tokens; its KV slot is free"
    return int(server.wait_for_log(pattern, timeout=30).group(1))


def test_client_cancel_frees_the_slot(narrow, media):
    with Client(narrow.address, timeout=60) as client:
        stream = client.caption(media["orbit"], max_new_tokens=3000, request_id="cancel-a")
        for _ in stream:
            if len(stream.token_ids) >= 3:
                break
        stream.close()  # cancels the call mid-stream
        follow = client.caption_full(media["portrait"], max_new_tokens=8, request_id="cancel-b")
    assert follow.finish_reason == "length" and len(follow.token_ids) == 8
    assert 3 <= slot_freed(narrow, "cancel-a") < 3000
    log = narrow.log_text()
    # One slot: the follow-up could only start once the cancelled request left it.
    assert log.index("cancel-a#") < log.index("[cancel-b] captioned")
    assert "[cancel-a] captioned" not in log
    narrow.wait_for_log(r"\[cancel-a\] /pllava\.v1\.Decoder/Caption -> CANCELLED after [\d.]+ s: the client went away")


def test_a_caption_cancelled_while_its_video_encodes_is_logged_under_its_id(narrow, media):
    """No token streamed yet, the video still at the encoder: the decoder's log still has one
    line under the request's id (there was none: only the metrics counted it)."""
    with Client(narrow.address, timeout=60) as client:
        stream = client.caption(media["portrait"], max_new_tokens=8, request_id="cancel-early", num_frames=3)
        threading.Timer(0.05, stream.close).start()
        with pytest.raises(CaptionError) as cancelled:
            for _ in stream:
                pass
    assert cancelled.value.status == grpc.StatusCode.CANCELLED
    narrow.wait_for_log(r"\[cancel-early\] /pllava\.v1\.Decoder/Caption -> CANCELLED after")


def test_deadline_exceeded_frees_the_slot(narrow, media):
    with Client(narrow.address) as client:
        client.caption_full(media["orbit"], max_new_tokens=1)  # cache the visual tokens: decode starts at once
        stream = client.caption(media["orbit"], max_new_tokens=3000, request_id="deadline-a", timeout=1.0)
        with pytest.raises(CaptionError) as expired:
            for _ in stream:
                pass
        assert expired.value.status == grpc.StatusCode.DEADLINE_EXCEEDED, expired.value
        assert len(stream.token_ids) < 3000, "the caption finished before its deadline: raise max_new_tokens"
        follow = client.caption_full(media["portrait"], max_new_tokens=8, request_id="deadline-b", timeout=60)
    assert len(follow.token_ids) == 8
    assert slot_freed(narrow, "deadline-a") < 3000
    narrow.wait_for_log(r"\[deadline-a\] /pllava\.v1\.Decoder/Caption -> DEADLINE_EXCEEDED after [\d.]+ s: its "
                        r"deadline ran out")


def test_a_full_queue_answers_resource_exhausted(tiny_model_dir, encoder, logs, media):
    """One slot, one queue place: with a caption running and another waiting, a third
    request is refused at once with RESOURCE_EXHAUSTED, and the server keeps serving."""
    with start_decoder(tiny_model_dir, f"dns:///127.0.0.1:{encoder.port}", logs,
                       "--max-batch", "1", "--max-queue", "1", "--max-context", "4096") as dec, \
            Client(dec.address, timeout=120) as client:
        client.caption_full(media["orbit"], max_new_tokens=1)  # cache the visual tokens
        running = client.caption(media["orbit"], max_new_tokens=3000, request_id="busy-a")
        next(iter(running))  # it holds the only slot now
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(client.caption_full, media["orbit"], None, max_new_tokens=4,
                                   request_id=f"busy-{name}") for name in ("b", "c")]
            refused = None
            deadline = time.monotonic() + 60
            while refused is None:  # the later of the two finds the queue full
                assert time.monotonic() < deadline, dec.log_tail()
                refused = next((f for f in futures if f.done()), None)
                time.sleep(0.02)
            with pytest.raises(CaptionError) as err:
                refused.result()
            assert err.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "busy" in err.value.message and "max queue 1" in err.value.message
            running.close()  # frees the slot: the waiting request runs
            waiting = next(f for f in futures if f is not refused)
            assert len(waiting.result(timeout=60).token_ids) == 4


# ---- two encoder replicas ----------------------------------------------------------------------

JOBS = [("orbit", None, 24), ("portrait", "What is the person doing?", 32), ("still0", "Describe the picture.", 16),
        ("still1", None, 20), ("still2", "What colours are there?", 28), ("still3", "Is anyone there?", 12),
        ("still4", "Describe the scene in detail.", 36), ("still5", None, 18)]


def run_jobs(address: str, media, tag: str, concurrent: bool):
    def one(i):
        name, prompt, n = JOBS[i]
        with Client(address, timeout=120) as client:
            return client.caption_full(media[name], prompt, max_new_tokens=n, request_id=f"{tag}-{i}")

    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(JOBS)) as pool:
            results = list(pool.map(one, range(len(JOBS))))
    else:
        results = [one(i) for i in range(len(JOBS))]
    return results, time.perf_counter() - start


def health_watches(encoder) -> float:
    """Health.Watch calls the encoder has seen start: one per client channel connected to it
    with health checking (the decoder's round robin)."""
    return value(scrape(f"http://127.0.0.1:{encoder.metrics_port}/metrics"), "pllava_grpc_server_started_total",
                 grpc_service="grpc.health.v1.Health", grpc_method="Watch", grpc_type="server_stream")


def test_the_decoder_connects_to_every_replica_before_its_first_call(pair):
    """Round robin picks among the replicas connected and SERVING: a decoder that connected at
    its first call sent a first burst to whichever replica answered first (7 of 8 videos)."""
    dec, first, second = pair
    deadline = time.monotonic() + 15
    while not (health_watches(first) and health_watches(second)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health_watches(first) >= 1 and health_watches(second) >= 1
    assert (encoded_ids(first) | encoded_ids(second)) <= {"-"}  # no call yet ("-": the start-up line)


@pytest.fixture(scope="module")
def first_burst(pair, media):
    """The eight jobs at once, the decoder's first calls to its encoders."""
    dec, _, _ = pair
    return run_jobs(dec.address, media, "together", concurrent=True)


@pytest.fixture(scope="module")
def singles(pair, media, first_burst):
    dec, _, _ = pair
    results, elapsed = run_jobs(dec.address, media, "single", concurrent=False)
    return results, elapsed


def test_eight_concurrent_captions_equal_their_single_results(pair, media, first_burst, singles):
    dec, first, second = pair
    single, sequential_s = singles
    together, concurrent_s = first_burst
    for (name, _, n), alone, both in zip(JOBS, single, together):
        assert len(alone.token_ids) == n, name
        assert (both.token_ids, both.caption) == (alone.token_ids, alone.caption), name
        assert not both.visual_tokens_cached
    print(f"\n8 captions: {sequential_s:.2f} s one after another, {concurrent_s:.2f} s together, "
          f"ratio {sequential_s / concurrent_s:.2f}")
    # Round robin: both replicas encoded some of the 16 videos, and some of the first burst
    # (the decoder connects to both at start, not at its first call).
    ids = {f"{tag}-{i}" for tag in ("single", "together") for i in range(len(JOBS))}
    by_first, by_second = encoded_ids(first) & ids, encoded_ids(second) & ids
    print(f"encoded by replica 1: {len(by_first)}, by replica 2: {len(by_second)}")
    assert by_first | by_second == ids
    burst = {f"together-{i}" for i in range(len(JOBS))}
    assert by_first & burst and by_second & burst


def test_a_killed_encoder_replica_is_routed_around(pair, media, singles):
    dec, first, second = pair
    single, _ = singles
    run_jobs(dec.address, media, "warm", concurrent=True)  # both replicas connected and ready
    first.send_signal(signal.SIGSTOP)  # freeze it: calls routed to it hang mid-run ...
    try:
        with ThreadPoolExecutor(len(JOBS)) as pool:
            futures = [pool.submit(lambda i=i: run_one(dec.address, media, i)) for i in range(len(JOBS))]
            # ... while the healthy replica serves its share of the round robin ...
            deadline = time.monotonic() + 60
            while len({i for i in encoded_ids(second) if i.startswith("kill-")}) < 2:
                assert time.monotonic() < deadline, second.log_tail()
                time.sleep(0.05)
            first.kill()  # ... then it dies with those calls in flight
            results = [f.result(timeout=120) for f in futures]
    finally:
        first.kill()  # with its video workers (the whole process group)
    for (name, _, _), alone, now in zip(JOBS, single, results):
        assert now.token_ids == alone.token_ids, name
    kill_ids = {f"kill-{i}" for i in range(len(JOBS))}
    assert encoded_ids(second) & kill_ids == kill_ids  # every video ended up on the survivor
    retries = dec.log_text().count("retrying on another replica")
    print(f"\nretried on the surviving replica: {retries} call(s)")
    assert retries >= 1


def run_one(address: str, media, i: int):
    name, prompt, n = JOBS[i]
    with Client(address, timeout=120) as client:
        return client.caption_full(media[name], prompt, max_new_tokens=n, request_id=f"kill-{i}")


def test_sigterm_lets_a_running_caption_finish(tiny_model_dir, encoder, logs, media):
    """SIGTERM: health turns NOT_SERVING, a new Caption gets UNAVAILABLE, and the caption
    already streaming runs to its end before the process exits 0."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    dec = start_decoder(tiny_model_dir, f"dns:///127.0.0.1:{encoder.port}", logs, "--max-batch", "1",
                        "--grace-s", "300", "--max-context", "4096")
    try:
        with grpc.insecure_channel(dec.address) as channel, Client(dec.address, timeout=300) as client:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stream = client.caption(media["orbit"], max_new_tokens=1500, request_id="drain-a")
            next(iter(stream))  # it is generating
            dec.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # asked without the client's retries: retried, the refusal can outlast the drain
            # (1500 tokens in ~3 s) and meet a closed port instead of "shutting down"
            with pytest.raises(CaptionError) as refused, \
                    Client(dec.address, timeout=60, retry_unavailable=False) as once:
                once.caption_full(media["portrait"], max_new_tokens=4)
            assert refused.value.status == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.message
            for _ in stream:
                pass
            assert stream.result.finish_reason == "length" and len(stream.token_ids) == 1500
        assert dec.wait(timeout=120) == 0
    finally:
        dec.kill()
