"""Prometheus metrics and request ids, for real: ``pllava up --metrics-port BASE
--openai-port 0`` runs an encoder, a decoder and the OpenAI-compatible front end as processes
on 127.0.0.1, captions go through the public client (videos and frames sent as images) and
the front end, and ``/metrics`` is scraped over HTTP and parsed with ``prometheus_client.parser``.

Counters only ever grow and the module's tests share one cluster, so each test compares a
scrape after its requests with one before them.
"""
from __future__ import annotations

import base64
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from pllava_client import CaptionError, Client
from pllava_client.channel import channel_options
from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc
from pllava_serving.launcher import check_metrics_ports
from pllava_serving.metrics import start_metrics_server
from servers import console_script, free_ports, scrape, value

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"^pllava up: decoder at (\S+) \(")
METRICS_AT = re.compile(r"^pllava up: (\S+) metrics at (\S+)$")
OPENAI_AT = re.compile(r"^pllava up: OpenAI-compatible API at (\S+)$")
MAX_BATCH = 2


class Up:
    """A ``pllava up`` process: its decoder address, metrics URLs, and every line it wrote."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.stdout: queue.Queue = queue.Queue()
        self.lines: list[str] = []  # stdout and stderr (the servers' logs, "NAME | line")
        self.address = ""
        self.openai_url = ""
        self.metrics: dict[str, str] = {}
        for stream, into in ((proc.stdout, self.stdout), (proc.stderr, None)):
            threading.Thread(target=self._pump, args=(stream, into), daemon=True).start()

    def _pump(self, stream, into) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            if into is not None:
                into.put(line.rstrip("\n"))
        if into is not None:
            into.put(None)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            line = self.stdout.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, "pllava up ended before it was ready:\n" + "\n".join(self.lines[-40:])
            if m := READY.match(line):
                self.address = m.group(1)
            elif m := METRICS_AT.match(line):
                self.metrics[m.group(1)] = m.group(2)
            elif m := OPENAI_AT.match(line):
                self.openai_url = m.group(1)
            elif line.startswith("  try:"):  # the last line of the banner
                return

    def log_of(self, server: str) -> list[str]:
        return [line.split(" | ", 1)[1] for line in list(self.lines) if line.startswith(f"{server} | ")]


@pytest.fixture(scope="module")
def up(tiny_model_dir):
    base = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pllava.cli", "up", "--model", str(tiny_model_dir), "--encoders", "1", "--port", "0",
         "--metrics-port", str(base), "--max-batch", str(MAX_BATCH), "--max-context", "4096",
         "--encoder-setting", "video_workers=1", "--openai-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    cluster = Up(proc)
    try:
        cluster.wait_ready(300)
        cluster.base = base
        yield cluster
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rpc(snapshot: dict, service: str, method: str, code: str) -> float:
    return value(snapshot, "pllava_grpc_server_handled_total", grpc_service=f"pllava.v1.{service}",
                 grpc_method=method, grpc_type="server_stream", grpc_code=code)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def both(up: Up) -> tuple[dict, dict]:
    return scrape(up.metrics["decoder"]), scrape(up.metrics["encoder-0"])


def new_image(folder: Path, seed: int) -> Path:
    """A still image no other test sends (a visual-cache miss)."""
    pixels = (np.random.default_rng(seed).random((120, 160, 3)) * 255).astype(np.uint8)
    path = folder / f"still-{seed}.png"
    Image.fromarray(pixels).save(path)
    return path


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# ---- the cluster -------------------------------------------------------------------------------

def test_pllava_up_prints_each_servers_metrics_address(up):
    assert up.metrics == {"decoder": f"http://127.0.0.1:{up.base}/metrics",
                          "encoder-0": f"http://127.0.0.1:{up.base + 1}/metrics"}
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", up.openai_url), up.openai_url  # no metrics of its own


NAME = re.compile(r"^(pllava_(decoder|encoder|grpc_server)|process)_[a-z0-9_]+$")


def test_metric_names_follow_prometheus_conventions_and_the_readme_lists_them(up):
    readme = (REPO / "README.md").read_text()
    for server, snapshot in zip(("decoder", "encoder"), both(up)):
        families = snapshot["families"]
        assert families, server
        for name, family in families.items():
            assert NAME.match(name), name
            if family.type == "counter":
                assert all(s.name == f"{name}_total" for s in family.samples), name
            else:
                assert not name.endswith("_total"), name
            if family.type == "histogram":
                assert any(s.name == f"{name}_bucket" and s.labels["le"] == "+Inf" for s in family.samples), name
            if "seconds" in name or "time" in name:
                assert name.endswith("_seconds") or family.type != "histogram", name
            if name.startswith("pllava_"):
                documented = f"{name}_total" if family.type == "counter" else name
                assert f"`{documented}`" in readme, f"{documented} is not listed in README.md"
        own = {n for n in families if n.startswith(f"pllava_{server}_")}
        assert len(own) >= 8, own
        assert "pllava_grpc_server_handled" in families and "process_resident_memory_bytes" in families
    decoder, encoder = both(up)
    for name in ("pllava_decoder_time_to_first_token_seconds", "pllava_decoder_time_per_output_token_seconds",
                 "pllava_decoder_prefill_step_seconds", "pllava_decoder_decode_step_seconds"):
        assert decoder["families"][name].type == "histogram", name
    for name in ("pllava_decoder_queue_depth", "pllava_decoder_running_sequences", "pllava_decoder_kv_slots_in_use"):
        assert decoder["families"][name].type == "gauge", name
    for name in ("pllava_decoder_visual_cache_hits", "pllava_decoder_visual_cache_misses",
                 "pllava_decoder_visual_token_bytes_received"):
        assert decoder["families"][name].type == "counter", name
    for name, kind in (("pllava_encoder_batch_size", "histogram"), ("pllava_encoder_video_decode_seconds", "histogram"),
                       ("pllava_encoder_frames", "counter"), ("pllava_encoder_visual_token_bytes_sent", "counter"),
                       ("pllava_encoder_video_workers_restarted", "counter"),
                       ("pllava_encoder_video_workers_busy", "gauge")):
        assert encoder["families"][name].type == kind, name


def test_a_caption_a_repeat_and_refusals_move_the_right_counters(up, videos_dir, tmp_path):
    video = new_image(tmp_path, seed=1)
    dec0, enc0 = both(up)
    with Client(up.address, timeout=120) as client:
        info = client.info()
        first = client.caption_full(video, max_new_tokens=5)
        dec1, enc1 = both(up)
        again = client.caption_full(video, "Another question?", max_new_tokens=5)
        dec2, enc2 = both(up)
        with pytest.raises(CaptionError) as not_a_video:
            client.caption_full(b"just some text, not a video", video_name="notes.txt", max_new_tokens=5)
        with pytest.raises(CaptionError) as bad_sampling:
            client.caption_full(video, max_new_tokens=5, temperature=-1.0)
    dec3, enc3 = both(up)
    assert not_a_video.value.status == bad_sampling.value.status == grpc.StatusCode.INVALID_ARGUMENT

    # The first caption: one miss, one Encode, one first token, its frames and bytes.
    assert delta(dec0, dec1, "pllava_decoder_time_to_first_token_seconds_count") == 1
    assert rpc(dec1, "Decoder", "Caption", "OK") - rpc(dec0, "Decoder", "Caption", "OK") == 1
    assert rpc(enc1, "Encoder", "Encode", "OK") - rpc(enc0, "Encoder", "Encode", "OK") == 1
    # ...seen from the decoder too: one Encode call that ended OK, at the first attempt
    assert delta(dec0, dec1, "pllava_decoder_encoder_calls_total", grpc_code="OK") == 1
    assert delta(dec0, dec1, "pllava_decoder_encoder_call_seconds_count") == 1
    assert delta(dec0, dec1, "pllava_decoder_encoder_retries_total") == 0
    assert delta(dec0, dec1, "pllava_decoder_visual_cache_misses_total", input="video") == 1
    assert delta(dec0, dec1, "pllava_decoder_visual_cache_hits_total", input="video") == 0
    assert delta(enc0, enc1, "pllava_encoder_frames_total") == first.num_frames == 1  # a still image
    assert delta(enc0, enc1, "pllava_encoder_batch_size_count") == 1
    assert delta(enc0, enc1, "pllava_encoder_batch_size_sum") == 1
    assert delta(enc0, enc1, "pllava_encoder_videos_total", input="video") == 1  # a still image sent as a file
    assert delta(enc0, enc1, "pllava_encoder_videos_total", input="frames") == 0
    assert delta(enc0, enc1, "pllava_encoder_video_decode_seconds_count", input="video") == 1
    assert delta(enc0, enc1, "pllava_encoder_video_decode_seconds_sum", input="video") > 0
    sent = delta(enc0, enc1, "pllava_encoder_visual_token_bytes_sent_total")
    assert sent == delta(dec0, dec1, "pllava_decoder_visual_token_bytes_received_total")
    assert sent == first.num_visual_tokens * info.text_hidden_size * 4  # float32 on CPU
    assert delta(dec0, dec1, "pllava_decoder_generated_tokens_total") == len(first.token_ids)
    reused = delta(dec0, dec1, "pllava_decoder_prompt_tokens_reused_total")
    assert reused > 0  # the template's text before <image>, which the warm-up request's prompt wrote
    assert first.num_prompt_tokens_reused == reused  # and the caption says so
    assert delta(dec0, dec1, "pllava_decoder_prompt_tokens_total") + reused == len(first.prompt_token_ids) - 1 \
        + first.num_visual_tokens  # the <image> id becomes the visual tokens
    assert delta(dec0, dec1, "pllava_decoder_prefill_step_seconds_count") >= 1
    assert delta(dec0, dec1, "pllava_decoder_decode_step_seconds_count") >= len(first.token_ids) - 1
    assert delta(dec0, dec1, "pllava_decoder_time_per_output_token_seconds_count") == \
        (1 if len(first.token_ids) >= 2 else 0)
    assert delta(dec0, dec1, "pllava_decoder_captions_total", finish_reason=first.finish_reason) == 1
    assert delta(dec0, dec1, "pllava_grpc_server_handling_seconds_count", grpc_service="pllava.v1.Decoder",
                 grpc_method="Caption", grpc_type="server_stream") == 1

    # The repeat: a cache hit, no Encode, no bytes.
    assert not first.visual_tokens_cached and again.visual_tokens_cached
    assert delta(dec1, dec2, "pllava_decoder_visual_cache_hits_total", input="video") == 1
    assert delta(dec1, dec2, "pllava_decoder_visual_cache_misses_total", input="video") == 0
    assert rpc(enc2, "Encoder", "Encode", "OK") == rpc(enc1, "Encoder", "Encode", "OK")
    assert delta(dec1, dec2, "pllava_decoder_visual_token_bytes_received_total") == 0
    assert delta(dec1, dec2, "pllava_decoder_time_to_first_token_seconds_count") == 1

    # The refusals: the text file reached the encoder and was refused by both, the bad
    # sampling parameters only by the decoder. No first token, no frames.
    assert rpc(dec3, "Decoder", "Caption", "INVALID_ARGUMENT") - rpc(dec2, "Decoder", "Caption", "INVALID_ARGUMENT") == 2
    assert rpc(enc3, "Encoder", "Encode", "INVALID_ARGUMENT") - rpc(enc2, "Encoder", "Encode", "INVALID_ARGUMENT") == 1
    assert rpc(dec3, "Decoder", "Caption", "OK") == rpc(dec2, "Decoder", "Caption", "OK")
    assert delta(dec2, dec3, "pllava_decoder_time_to_first_token_seconds_count") == 0
    assert delta(enc2, enc3, "pllava_encoder_frames_total") == 0

    # Idle again: nothing queued or holding a slot; the slots are max_batch.
    for name in ("pllava_decoder_queue_depth", "pllava_decoder_running_sequences", "pllava_decoder_kv_slots_in_use",
                 "pllava_decoder_kv_positions_in_use"):
        assert value(dec3, name) == 0, name
    assert value(dec3, "pllava_decoder_kv_slots") == MAX_BATCH
    assert value(enc3, "pllava_encoder_requests_in_progress") == 0
    assert value(enc3, "pllava_encoder_video_workers_restarted_total") == 0
    assert value(enc3, "pllava_encoder_video_workers_busy") == 0


def test_gauges_show_a_running_caption_and_cancel_and_deadline_are_counted(up, videos_dir):
    dec0, _ = both(up)
    with Client(up.address, timeout=120) as client:
        client.caption_full(videos_dir / "orbit.mp4", max_new_tokens=1)  # cached: the next ones decode at once
        stream = client.caption(videos_dir / "orbit.mp4", max_new_tokens=3000)
        for _ in stream:
            if len(stream.token_ids) >= 3:
                break
        running = scrape(up.metrics["decoder"])  # while it decodes
        stream.close()  # cancels the call mid-stream
        expiring = client.caption(videos_dir / "orbit.mp4", max_new_tokens=3000, timeout=1.0)  # ~3 s of decode
        with pytest.raises(CaptionError) as expired:
            for _ in expiring:
                pass
    assert expired.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(expiring.token_ids) < 3000, "the caption finished before its deadline: raise max_new_tokens"
    assert value(running, "pllava_decoder_running_sequences") == 1
    assert value(running, "pllava_decoder_kv_slots_in_use") == 1
    assert value(running, "pllava_decoder_kv_positions_in_use") > 576

    def counted() -> bool:
        now = scrape(up.metrics["decoder"])
        return (rpc(now, "Decoder", "Caption", "CANCELLED") - rpc(dec0, "Decoder", "Caption", "CANCELLED") == 1
                and rpc(now, "Decoder", "Caption", "DEADLINE_EXCEEDED")
                - rpc(dec0, "Decoder", "Caption", "DEADLINE_EXCEEDED") == 1)

    wait_for(counted)
    dec1 = scrape(up.metrics["decoder"])
    assert rpc(dec1, "Decoder", "Caption", "OK") - rpc(dec0, "Decoder", "Caption", "OK") == 1
    # The cached caption and the cancelled one had their first token; the expired one may have.
    assert 2 <= delta(dec0, dec1, "pllava_decoder_time_to_first_token_seconds_count") <= 3
    wait_for(lambda: value(scrape(up.metrics["decoder"]), "pllava_decoder_kv_slots_in_use") == 0)


def test_frames_sent_as_images_are_counted_and_cached_under_their_own_label(up, tmp_path):
    images = [new_image(tmp_path, seed=10 + i).read_bytes() for i in range(3)]  # one size, never sent before
    dec0, enc0 = both(up)
    with Client(up.address, timeout=120) as client:
        info = client.info()
        first = client.caption_full(frames=images, max_new_tokens=3)
        dec1, enc1 = both(up)
        again = client.caption_full(frames=images, prompt="What moves?", max_new_tokens=3)
    dec2, enc2 = both(up)

    # The first: a frames miss, one Encode, the frames sent through the vision tower.
    assert not first.visual_tokens_cached and first.num_frames >= len(images)
    assert rpc(enc1, "Encoder", "Encode", "OK") - rpc(enc0, "Encoder", "Encode", "OK") == 1
    # ...seen from the decoder too: one Encode call that ended OK, at the first attempt
    assert delta(dec0, dec1, "pllava_decoder_encoder_calls_total", grpc_code="OK") == 1
    assert delta(dec0, dec1, "pllava_decoder_encoder_call_seconds_count") == 1
    assert delta(dec0, dec1, "pllava_decoder_encoder_retries_total") == 0
    assert delta(dec0, dec1, "pllava_decoder_visual_cache_misses_total", input="frames") == 1
    assert delta(dec0, dec1, "pllava_decoder_visual_cache_misses_total", input="video") == 0
    assert delta(enc0, enc1, "pllava_encoder_videos_total", input="frames") == 1
    assert delta(enc0, enc1, "pllava_encoder_videos_total", input="video") == 0
    assert delta(enc0, enc1, "pllava_encoder_video_decode_seconds_count", input="frames") == 1
    assert delta(enc0, enc1, "pllava_encoder_video_decode_seconds_count", input="video") == 0
    assert delta(enc0, enc1, "pllava_encoder_frames_total") == first.num_frames
    sent = delta(enc0, enc1, "pllava_encoder_visual_token_bytes_sent_total")
    assert sent == delta(dec0, dec1, "pllava_decoder_visual_token_bytes_received_total")
    assert sent == first.num_visual_tokens * info.text_hidden_size * 4  # float32 on CPU
    assert delta(dec0, dec1, "pllava_decoder_time_to_first_token_seconds_count") == 1

    # The same frames again: a frames hit, no Encode, no bytes.
    assert again.visual_tokens_cached
    assert delta(dec1, dec2, "pllava_decoder_visual_cache_hits_total", input="frames") == 1
    assert delta(dec1, dec2, "pllava_decoder_visual_cache_hits_total", input="video") == 0
    assert rpc(enc2, "Encoder", "Encode", "OK") == rpc(enc1, "Encoder", "Encode", "OK")
    assert delta(dec1, dec2, "pllava_decoder_visual_token_bytes_received_total") == 0
    assert rpc(dec2, "Decoder", "Caption", "OK") - rpc(dec0, "Decoder", "Caption", "OK") == 2

    # The frames caption has one request id in both servers' logs, as a video's has.
    rid = first.request_id
    wait_for(lambda: logged_with(up.log_of("decoder"), rid) and logged_with(up.log_of("encoder-0"), rid), timeout=10)
    assert any("visual tokens" in line for line in logged_with(up.log_of("encoder-0"), rid))


# ---- one request id in both servers' logs ----------------------------------------------------------

def logged_with(lines: list[str], request_id: str) -> list[str]:
    return [line for line in lines if f"[{request_id}]" in line]


def test_one_caption_has_one_request_id_in_both_servers_logs(up, tmp_path):
    with Client(up.address, timeout=120) as client:
        result = client.caption_full(new_image(tmp_path, seed=2), max_new_tokens=3)  # no id given: one is made up
    rid = result.request_id
    assert re.fullmatch(r"[0-9a-f]{12}", rid), rid  # the final event names the id the logs use

    def in_both() -> bool:
        return bool(logged_with(up.log_of("decoder"), rid)) and bool(logged_with(up.log_of("encoder-0"), rid))

    wait_for(in_both, timeout=10)
    assert any("captioned" in line for line in logged_with(up.log_of("decoder"), rid))
    assert any("visual tokens" in line for line in logged_with(up.log_of("encoder-0"), rid))


def test_a_client_supplied_x_request_id_names_the_caption_in_both_logs(up, tmp_path):
    video = new_image(tmp_path, seed=3).read_bytes()
    with grpc.insecure_channel(up.address, options=channel_options()) as channel:
        events = list(pllava_pb2_grpc.DecoderStub(channel).Caption(
            pllava_pb2.CaptionRequest(video=video, video_name="trace.png",
                                      sampling=pllava_pb2.SamplingParams(max_new_tokens=2)),
            metadata=(("x-request-id", "trace-4711"),), timeout=120))
    assert events[-1].final.request_id == "trace-4711"
    wait_for(lambda: logged_with(up.log_of("decoder"), "trace-4711") and logged_with(up.log_of("encoder-0"),
                                                                                       "trace-4711"), timeout=10)


def test_the_openai_front_ends_request_id_names_the_caption_in_every_log(up, tmp_path):
    image = new_image(tmp_path, seed=4).read_bytes()
    with urllib.request.urlopen(f"{up.openai_url}/models", timeout=30) as response:
        model = json.load(response)["data"][0]["id"]
    body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}]}]}
    dec0 = scrape(up.metrics["decoder"])
    request = urllib.request.Request(f"{up.openai_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", "x-request-id": "oa-trace-17"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200 and response.headers["x-request-id"] == "oa-trace-17"
        answer = json.load(response)
    assert answer["usage"]["completion_tokens"] >= 1
    dec1 = scrape(up.metrics["decoder"])
    assert rpc(dec1, "Decoder", "Caption", "OK") - rpc(dec0, "Decoder", "Caption", "OK") == 1
    assert delta(dec0, dec1, "pllava_decoder_visual_cache_misses_total", input="video") == 1

    def in_every_log() -> bool:
        return (bool(logged_with(up.log_of("decoder"), "oa-trace-17"))
                and bool(logged_with(up.log_of("encoder-0"), "oa-trace-17"))
                and any("oa-trace-17" in line for line in up.log_of("openai")))

    wait_for(in_every_log, timeout=10)
    assert any("captioned" in line for line in logged_with(up.log_of("decoder"), "oa-trace-17"))


# ---- settings and start-up ---------------------------------------------------------------------

def test_metrics_port_zero_is_off_and_a_port_serves_the_registry():
    registry = CollectorRegistry()
    assert start_metrics_server(registry, "127.0.0.1", 0) is None
    port = free_ports(1)
    server = start_metrics_server(registry, "127.0.0.1", port)
    try:
        assert server.port == port
        assert scrape(f"http://127.0.0.1:{port}/metrics")["families"] == {}  # this registry only: empty
    finally:
        server.close()


def test_metrics_read_at_scrape_time_answer_a_scrape_filtered_by_name():
    """A metric added to a ReadOnCollect after it was registered is known to the registry by
    name: /metrics?name[]=... returns it (it returned nothing), and a name read twice is refused."""
    from prometheus_client import generate_latest

    from pllava_serving.metrics import ReadOnCollect

    registry = CollectorRegistry()
    reader = ReadOnCollect(registry)
    reader.add("gauge", "pllava_test_busy", "workers busy", lambda: 3)
    reader.add("counter", "pllava_test_restarted", "restarts", lambda: 1)
    filtered = generate_latest(registry.restricted_registry(["pllava_test_busy", "pllava_test_restarted_total"]))
    assert b"pllava_test_busy 3.0" in filtered and b"pllava_test_restarted_total 1.0" in filtered, filtered
    with pytest.raises(ValueError, match="already read here"):
        reader.add("gauge", "pllava_test_busy", "again", lambda: 0)


def test_metrics_port_settings_are_checked():
    from pllava_decoder.settings import DecoderSettings
    from pllava_encoder.settings import EncoderSettings

    assert EncoderSettings(model="m").metrics_port == 0 and DecoderSettings(model="m").metrics_port == 0
    with pytest.raises(ValueError, match=r"metrics_port must be in 0\.\.65535"):
        EncoderSettings(model="m", metrics_port=70000)
    with pytest.raises(ValueError, match="metrics_port must differ from port"):
        DecoderSettings(model="m", port=9000, metrics_port=9000)
    with pytest.raises(ValueError, match="include the gRPC port"):
        check_metrics_ports(50051, encoders=2, port=50052, encoder_port=0)
    with pytest.raises(ValueError, match="must lie in 1..65535"):
        check_metrics_ports(65535, encoders=1, port=0, encoder_port=0)
    with pytest.raises(ValueError, match="include the OpenAI-compatible API's port 9465"):
        check_metrics_ports(9464, encoders=2, port=50052, encoder_port=0, openai_port=9465)
    check_metrics_ports(9464, encoders=2, port=50052, encoder_port=0, openai_port=8000)
    check_metrics_ports(9464, encoders=3, port=50052, encoder_port=50060)


def test_a_taken_metrics_port_stops_the_server_with_a_clear_message(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([console_script("pllava-encoder"), "--model", str(tiny_model_dir), "--port", "0",
                               "--metrics-port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr


def test_every_part_of_a_chunk_run_in_parts_is_a_prefill_step_and_its_tokens_count_once():
    from pllava.generation import StepTimes
    from pllava_decoder.metrics import DecoderMetrics

    metrics = DecoderMetrics(CollectorRegistry())
    for part, fed in ((1, 0), (2, 16)):  # a 16-position chunk in two parts, beside 3 streams
        metrics.record_step(StepTimes(0.04, fed, 0.04, 3, prefill_part=part), generated_tokens=3)
    metrics.record_step(StepTimes(0.0, 0, 0.02, 3), generated_tokens=3)  # a decode step alone
    value = metrics.registry.get_sample_value
    assert value("pllava_decoder_prefill_step_seconds_count") == 2
    assert value("pllava_decoder_decode_step_seconds_count") == 3
    assert value("pllava_decoder_prompt_tokens_total") == 16
