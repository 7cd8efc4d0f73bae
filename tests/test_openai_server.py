"""``pllava-openai`` for real: encoder, decoder and front end as processes on 127.0.0.1, the
official ``openai`` package as the client, the gRPC client as the reference.

Servers (module-scoped):
- one encoder and ONE decoder with one slot, one queue place and a 4096-token context (long
  captions to cancel, a full queue to refuse); the first look at the front end is taken while
  that decoder still loads;
- ``api``: the front end as operators start it (data URLs only, no key);
- ``open_api``: a second front end with a media folder, downloads on, a small media limit
  and an API key file.

Which request the decoder cancelled is read from its log: the front end passes its request
id (the caller's ``x-request-id``) to the decoder, which logs ``<id>#<n> cancelled after K
generated tokens; its KV slot is free``.
"""
from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from pllava_client import Client
from pllava_openai.server import build_parser
from pllava_openai.settings import ENV_PREFIX, OpenAISettings
from pllava_serving.settings import given_flags, load_settings
from servers import console_script, start_encoder, start_openai, start_server

MAX_CONTEXT = 4096


# ---- servers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openai-server-logs")


@pytest.fixture(scope="module")
def encoder(tiny_model_dir, logs):
    with start_encoder(tiny_model_dir, log_dir=logs) as server:
        yield server


@pytest.fixture(scope="module")
def stack(tiny_model_dir, encoder, logs):
    """(decoder, front end, what the front end said while the decoder was still loading)."""
    decoder = start_server([console_script("pllava-decoder"), "--model", str(tiny_model_dir), "--host", "127.0.0.1",
                            "--port", "0", "--encoder", f"dns:///127.0.0.1:{encoder.port}", "--max-batch", "1",
                            "--max-queue", "1", "--max-context", str(MAX_CONTEXT)],
                           name="decoder", log_dir=logs, wait_serving=False)
    try:
        front = start_openai(decoder.address, logs, wait_ready=False)
        try:
            early = {"health": get(front, "/health"),
                     "completion": post_json(front, "/v1/chat/completions", chat_body("any-model", video_part()))}
            early["decoder_was_loading"] = "serving;" not in decoder.log_text()
            deadline = time.monotonic() + 600
            while get(front, "/health")[0] != 200:
                assert decoder.alive() and time.monotonic() < deadline, decoder.log_tail()
                time.sleep(0.5)
            yield decoder, front, early
        finally:
            front.stop()
    finally:
        decoder.stop()


@pytest.fixture(scope="module")
def decoder(stack):
    return stack[0]


@pytest.fixture(scope="module")
def api(stack):
    return stack[1]


@pytest.fixture(scope="module")
def model_id(decoder) -> str:
    with Client(decoder.address, timeout=30) as client:
        return client.info().model_id


@pytest.fixture(scope="module")
def oa(api) -> openai.OpenAI:
    return openai_client(api)


@pytest.fixture(scope="module")
def grpc_client(decoder):
    with Client(decoder.address, timeout=300) as client:
        yield client


TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    """The folder a front end allows files from: two samples and a link that leads out."""
    root = tmp_path_factory.mktemp("media-root")
    for name in ("still.jpg", "orbit.mp4"):
        (root / name).write_bytes((SAMPLES / name).read_bytes())
    (root / "escape.jpg").symlink_to(SAMPLES / "still.jpg")
    return root


@pytest.fixture(scope="module")
def open_api(decoder, logs, media_root):
    """Files under media_root, downloads, media up to 50 kB, and an API key."""
    tokens = logs / "tokens.txt"
    tokens.write_text(f"# keys\nother-token\n\n{TOKEN}\n")
    with start_openai(decoder.address, logs, "--allowed-media-root", str(media_root), "--allow-remote-media",
                      "--allow-private-media-hosts",  # the test's media site is on 127.0.0.1
                      "--max-media-bytes", "50000", "--auth-token-file", str(tokens),
                      "--model-name", "pllava-tiny") as server:
        yield server


@pytest.fixture(scope="module")
def media_site(videos_dir):
    """samples/ served over HTTP on 127.0.0.1 (for the downloads a front end may make)."""
    handler = functools.partial(_QuietHandler, directory=str(videos_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/to-ftp":  # a redirect off http(s)
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/still.jpg")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


# ---- helpers ---------------------------------------------------------------------------------------

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def data_url(path: Path, media_type: str = "video/mp4") -> str:
    return f"data:{media_type};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def video_part(path: Path = SAMPLES / "orbit.mp4", media_type: str = "video/mp4") -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(path, media_type)}}


def image_part(path: Path = SAMPLES / "still.jpg") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path, "image/jpeg")}}


def user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def chat_body(model: str, *parts: dict, **fields) -> dict:
    return {"model": model, "messages": user(*parts), **fields}


def openai_client(server, api_key: str = "unused", timeout: float = 300.0) -> openai.OpenAI:
    # No retries: a test sees every status the server answers.
    return openai.OpenAI(base_url=f"http://{server.address}/v1", api_key=api_key, max_retries=0, timeout=timeout)


def get(server, path: str, headers: dict | None = None) -> tuple[int, dict]:
    return _http(urllib.request.Request(f"http://{server.address}{path}", headers=headers or {}))


def post_json(server, path: str, body, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{server.address}{path}", data=data, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
    return _http(request)


def _http(request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def slot_freed(decoder, request_id: str) -> int:
    """Generated tokens of ``request_id`` when the decoder cancelled it and freed its slot."""
    pattern = rf"{re.escape(request_id)}#\d+ cancelled after (\d+) generated tokens; its KV slot is free"
    return int(decoder.wait_for_log(pattern, timeout=60).group(1))


def prompt_tokens(result) -> int:
    """What the model read: the text tokens, the image placeholder replaced by the visual tokens."""
    return len(result.prompt_token_ids) - 1 + result.num_visual_tokens


# ---- settings -------------------------------------------------------------------------------------------

def test_settings_layers_and_refusals(tmp_path):
    args = build_parser().parse_args(["--model-name", "m", "--no-allow-remote-media"])
    s = load_settings(OpenAISettings, env_prefix=ENV_PREFIX, overrides=given_flags(args, OpenAISettings),
                      environ={"PLLAVA_OPENAI_ALLOW_REMOTE_MEDIA": "true", "PLLAVA_OPENAI_MAX_MEDIA_BYTES": "1000"})
    assert (s.allow_remote_media, s.max_media_bytes, s.model_name, s.port) == (False, 1000, "m", 8000)
    empty = tmp_path / "keys.txt"
    empty.write_text("# no key yet\n\n")
    for argv, message in ((["--port", "70000"], "port must be in 0..65535"),
                          (["--max-concurrent-requests", "0"], "max_concurrent_requests must be >= 1"),
                          (["--auth-token-file", str(empty), "--port", "0"], "holds no token")):
        done = subprocess.run([console_script("pllava-openai"), *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)
    done = subprocess.run([console_script("pllava-openai"), "--port", "0"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PLLAVA_OPENAI_PROT": "1"})
    assert done.returncode == 2 and "PLLAVA_OPENAI_PORT" in done.stderr


# ---- loading, models, health -------------------------------------------------------------------------

def test_503_while_the_decoder_loads(stack):
    _, _, early = stack
    assert early["decoder_was_loading"], "the decoder was ready before the first look: nothing was tested"
    for status, body in (early["health"], early["completion"]):
        assert status == 503, body
        assert body["error"]["code"] == "unavailable" and "loading" in body["error"]["message"]
        assert body["error"]["type"] == "service_unavailable"


def test_models_and_health(oa, api, model_id):
    assert [m.id for m in oa.models.list()] == [model_id]
    assert oa.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4o")
    assert get(api, "/health") == (200, {"status": "ok", "model": model_id})  # no key here: the model is no secret


# ---- answers equal the gRPC caption ------------------------------------------------------------------

@pytest.mark.parametrize("part, path", [(video_part(), SAMPLES / "orbit.mp4"),
                                        (image_part(), SAMPLES / "still.jpg")], ids=["video", "image"])
def test_greedy_answer_equals_the_grpc_caption(oa, grpc_client, model_id, part, path):
    answer = oa.chat.completions.create(model=model_id, messages=user(text("What happens here?"), part),
                                        max_tokens=24)
    expected = grpc_client.caption_full(path, "What happens here?", max_new_tokens=24)
    assert len(expected.token_ids) == 24
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.caption
    assert choice.finish_reason == "length"
    assert answer.model == model_id and answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.usage.prompt_tokens == prompt_tokens(expected) > expected.num_visual_tokens == 576
    assert answer.usage.completion_tokens == 24
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 24
    # the template's text before the video, already in the decoder's cache (both prompts share it)
    assert answer.usage.prompt_tokens_details.cached_tokens == expected.num_prompt_tokens_reused > 0


def test_stream_is_the_grpc_stream_piece_by_piece(oa, grpc_client, model_id):
    stream = oa.chat.completions.create(model=model_id, messages=user(video_part(SAMPLES / "portrait.mp4")),
                                        max_completion_tokens=20, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    grpc_stream = grpc_client.caption(SAMPLES / "portrait.mp4", max_new_tokens=20)
    pieces = list(grpc_stream)
    expected = grpc_stream.result

    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert contents == pieces and len(pieces) > 5  # one chunk per text piece the decoder sent
    assert "".join(contents) == expected.caption
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == prompt_tokens(expected)


def test_raw_stream_ends_with_done(api, model_id):
    body = chat_body(model_id, video_part(), max_tokens=3, stream=True)
    request = urllib.request.Request(f"http://{api.address}/v1/chat/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_sampling_fields_read_as_openai_and_vllm_clients_mean_them():
    """top_p or top_k without a temperature sample (at OpenAI's default temperature 1: they
    were dropped into greedy decoding before); with temperature 0 they change nothing;
    top_k -1 is vLLM's "off"; the neutral values clients send by default are accepted."""
    from pllava_openai.chat_request import parse_chat_request

    def parsed(**fields):
        request = parse_chat_request(chat_body("m", video_part(), **fields))
        return request.temperature, request.top_p, request.top_k

    assert parsed() == (None, None, None)  # greedy, the decoder's default
    assert parsed(top_p=0.9) == (1.0, 0.9, None) and parsed(top_k=40) == (1.0, None, 40)
    assert parsed(top_p=1) == (None, 1.0, None) and parsed(top_k=-1) == (None, None, None)
    assert parsed(temperature=0, top_p=0.5, top_k=3) == (0.0, None, None)
    assert parsed(temperature=0.7, top_p=0.5, top_k=3) == (0.7, 0.5, 3)
    neutral = dict(logit_bias={}, min_p=0, min_tokens=0, ignore_eos=False, best_of=1, use_beam_search=False,
                   skip_special_tokens=True, include_stop_str_in_output=False, stop_token_ids=[])
    assert parsed(**neutral) == (None, None, None)


def test_sampling_parameters_reach_the_decoder(oa, grpc_client, model_id):
    kwargs = dict(temperature=0.9, top_p=0.8, seed=1234)
    answers = [oa.chat.completions.create(model=model_id, messages=user(text("Go on."), video_part()),
                                          max_tokens=16, extra_body={"num_frames": 2, "top_k": 50}, **kwargs)
               for _ in range(2)]
    expected = grpc_client.caption_full(SAMPLES / "orbit.mp4", "Go on.", max_new_tokens=16, num_frames=2,
                                        top_k=50, **kwargs)
    greedy = grpc_client.caption_full(SAMPLES / "orbit.mp4", "Go on.", max_new_tokens=16, num_frames=2)
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content == expected.caption
    assert expected.token_ids != greedy.token_ids  # sampling did change the tokens
    assert answers[0].usage.prompt_tokens == prompt_tokens(expected)
    assert expected.num_frames == 2 and expected.num_visual_tokens < 576
    # top_p alone: sampling at temperature 1, as the gRPC call with it spelled out
    alone = oa.chat.completions.create(model=model_id, messages=user(text("Go on."), video_part()), max_tokens=16,
                                       top_p=0.8, seed=1234, extra_body={"num_frames": 2})
    assert alone.choices[0].message.content == grpc_client.caption_full(
        SAMPLES / "orbit.mp4", "Go on.", max_new_tokens=16, num_frames=2, temperature=1.0, top_p=0.8,
        seed=1234).caption
    # vLLM's spelling of the frame count
    vllm = oa.chat.completions.create(model=model_id, messages=user(text("Go on."), video_part()), max_tokens=16,
                                      extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}})
    assert vllm.choices[0].message.content == greedy.caption


def test_stop_strings(oa, grpc_client, model_id):
    full = grpc_client.caption_full(SAMPLES / "orbit.mp4", max_new_tokens=24).caption
    stop = full[10:12]
    answer = oa.chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=24, stop=[stop])
    expected = grpc_client.caption_full(SAMPLES / "orbit.mp4", max_new_tokens=24, stop=[stop])
    assert expected.finish_reason == "stop_string"
    assert answer.choices[0].message.content == expected.caption == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


# ---- refusals ------------------------------------------------------------------------------------------

def _bad_requests(model_id: str) -> list[tuple[str, dict]]:
    good = video_part()
    return [
        ("not a video", chat_body(model_id, {"type": "video_url", "video_url": {
            "url": "data:video/mp4;base64," + base64.b64encode(b"just some text, not a video").decode()}})),
        ("bad base64", chat_body(model_id, {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@@"}})),
        ("not base64", chat_body(model_id, {"type": "video_url", "video_url": {"url": "data:video/mp4,abc"}})),
        ("not a media type", chat_body(model_id, {"type": "video_url", "video_url": {
            "url": "data:text/plain;base64,aGVsbG8="}})),
        ("no video", chat_body(model_id, text("What happens?"))),
        ("two videos", chat_body(model_id, good, good)),
        ("text only", {"model": model_id, "messages": [{"role": "user", "content": "Describe it."}]}),
        ("system message", {"model": model_id, "messages": [{"role": "system", "content": "Be brief."},
                                                            *user(good)]}),
        ("audio part", chat_body(model_id, good, {"type": "input_audio", "input_audio": {}})),
        ("n", chat_body(model_id, good, n=2)),
        ("temperature", chat_body(model_id, good, temperature=-1)),
        ("temperature NaN", chat_body(model_id, good, temperature=float("nan"))),  # json.dumps writes NaN
        ("repetition_penalty Infinity", chat_body(model_id, good, repetition_penalty=float("inf"))),
        ("top_p", chat_body(model_id, good, top_p=0)),
        ("max_tokens", chat_body(model_id, good, max_tokens=0)),
        ("seed", chat_body(model_id, good, seed="x")),
        ("stop", chat_body(model_id, good, stop=[1])),
        ("num_frames", chat_body(model_id, good, num_frames=1000)),
        ("template", chat_body(model_id, good, template="nope")),
        ("tools", chat_body(model_id, good, tools=[{"type": "function", "function": {"name": "f"}}])),
        ("file path off", chat_body(model_id, {"type": "video_url", "video_url": {"url": str(SAMPLES / "orbit.mp4")}})),
        ("file url off", chat_body(model_id, {"type": "video_url", "video_url": {
            "url": (SAMPLES / "orbit.mp4").as_uri()}})),
        ("download off", chat_body(model_id, {"type": "video_url", "video_url": {
            "url": "http://127.0.0.1:9/video.mp4"}})),
        ("no model", {"messages": user(good)}),
        ("text that is not Unicode", chat_body(model_id, text("caf\ud800"), good)),  # json.dumps escapes it
        ("media type with a line break", chat_body(model_id, {"type": "video_url", "video_url": {
            "url": "data:video/mp4\nforged log line;base64,AAAA"}})),
        ("frequency_penalty", chat_body(model_id, good, frequency_penalty=0.5)),
        ("guided_json", chat_body(model_id, good, guided_json={"type": "object"})),
        ("logit_bias", chat_body(model_id, good, logit_bias={"5": -100})),
        ("ignore_eos", chat_body(model_id, good, ignore_eos=True)),
        ("temperature past float32", chat_body(model_id, good, temperature=1e39)),
        ("top_p under float32", chat_body(model_id, good, top_p=1e-46)),
    ]


MESSAGES = {
    "not a video": "not a video", "bad base64": "not valid base64", "not base64": "base64-encoded",
    "not a media type": "text/plain", "no video": "exactly one video_url", "two videos": "got 2",
    "text only": "only text", "system message": "system messages are not supported", "audio part": "input_audio",
    "n": "'n' must be 1", "temperature": "temperature",
    "temperature NaN": "'temperature' must be a finite number, got nan",
    "repetition_penalty Infinity": "'repetition_penalty' must be a finite number, got inf", "top_p": "top_p", "max_tokens": "max_tokens",
    "seed": "seed", "stop": "stop", "num_frames": "frames", "template": "nope", "tools": "tools",
    "file path off": "--allowed-media-root", "file url off": "--allowed-media-root",
    "download off": "--allow-remote-media", "no model": "model",
    "text that is not Unicode": "prompt must be a string", "media type with a line break": "'video/mp4\\nforged",
    "frequency_penalty": "'frequency_penalty' other than 0 is not supported", "guided_json": "structured output",
    "logit_bias": "'logit_bias' is not supported (only {}, which changes nothing), got {\"5\": -100}",
    "ignore_eos": "'ignore_eos' is not supported (only false",
    "temperature past float32": "temperature must be a number a 32-bit float holds",
    "top_p under float32": "top_p must be a number a 32-bit float holds",
}


def test_bad_requests_get_400_and_the_server_keeps_serving(api, oa, model_id):
    for name, body in _bad_requests(model_id):
        status, answer = post_json(api, "/v1/chat/completions", body)
        assert status == 400, (name, answer)
        error = answer["error"]
        assert error["type"] == "invalid_request_error", (name, error)
        assert MESSAGES[name] in error["message"], (name, error)
    # the openai package raises its BadRequestError for them
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model=model_id, messages=user(text("Hi")), max_tokens=4)
    assert "exactly one video_url" in err.value.message
    status, answer = post_json(api, "/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = post_json(api, "/v1/chat/completions", None, raw=b"[" * 100_000)
    assert status == 400 and "nested too deeply" in answer["error"]["message"]
    refused = urllib.request.Request(f"http://{api.address}/v1/chat/completions", data=b"{}", method="POST",
                                     headers={"content-type": "application/json", "x-request-id": "refused-1"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(refused, timeout=60)
    assert err.value.code == 400 and err.value.headers["x-request-id"] == "refused-1"
    api.wait_for_log(r"INFO pllava_openai \[refused-1\] POST /v1/chat/completions -> 400")  # the log has the id too
    status, answer = post_json(api, "/v1/chat/completions", chat_body("gpt-4o", video_part()))
    assert status == 404 and answer["error"]["code"] == "model_not_found" and model_id in answer["error"]["message"]
    status, answer = get(api, "/v2/nothing")
    assert status == 404 and "error" in answer
    # still serving
    answer = oa.chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=3)
    assert answer.usage.completion_tokens == 3


def test_api_keys(open_api, api):
    # health needs no key (Docker's check has none), so it names nothing a key guards
    assert get(open_api, "/health") == (200, {"status": "ok"})
    with pytest.raises(openai.AuthenticationError) as err:
        openai_client(open_api, api_key="wrong-token").models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert "a wrong 'Authorization: Bearer <token>' header" in err.value.message
    status, answer = get(open_api, "/v1/models")
    assert status == 401 and "no 'Authorization: Bearer <token>' header" in answer["error"]["message"]
    status, _ = get(open_api, "/v1/models", headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401
    status, answer = post_json(open_api, "/v1/chat/completions", chat_body("pllava-tiny", video_part()))
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert [m.id for m in openai_client(open_api, api_key=TOKEN).models.list()] == ["pllava-tiny"]
    assert [m.id for m in openai_client(open_api, api_key="other-token").models.list()] == ["pllava-tiny"]
    assert get(api, "/v1/models")[0] == 200  # a front end without a key file needs none


def test_files_and_downloads_where_the_operator_allows_them(open_api, grpc_client, media_site, media_root):
    oa = openai_client(open_api, api_key=TOKEN)
    expected = grpc_client.caption_full(SAMPLES / "still.jpg", max_new_tokens=8).caption

    def ask(url: str, kind: str = "image_url") -> str:
        part = {"type": kind, kind: {"url": url}}
        return oa.chat.completions.create(model="pllava-tiny", messages=user(part), max_tokens=8).choices[0].message.content

    assert ask((media_root / "still.jpg").as_uri()) == expected  # file:// URL
    assert ask(str(media_root / "still.jpg")) == expected        # an absolute path
    assert ask("still.jpg") == expected                          # a path relative to the media folder
    assert ask(f"{media_site}/still.jpg") == expected             # a download
    refusals = {(SAMPLES / "still.jpg").as_uri(): "not under the folder", "../x.jpg": "not under the folder",
                "escape.jpg": "not under the folder",             # a link that leads out
                "missing.jpg": "no such file", f"{media_site}/missing.mp4": "HTTP 404",
                # orbit.mp4 is above this front end's 50 kB limit
                "orbit.mp4": "at most 50000 bytes", f"{media_site}/orbit.mp4": "at most 50000 bytes"}
    for url, message in refusals.items():
        with pytest.raises(openai.APIStatusError) as err:
            ask(url, "video_url")
        assert err.value.status_code in (400, 413) and message in err.value.message, (url, err.value.message)
        if "at most" in message:
            assert err.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as err:
        oa.chat.completions.create(model="pllava-tiny", messages=user(video_part()), max_tokens=2)
    assert err.value.status_code == 413  # the whole body is over the limit too
    # A URL's credentials (a password, a pre-signed query) stay out of messages and logs.
    host = media_site.removeprefix("http://")
    for url in (f"http://user:pa55word@{host}/missing.mp4?X-Amz-Signature=S3CRET#frag",
                f"http://{host}/?token=S3CRET"):
        with pytest.raises(openai.APIStatusError) as err:
            ask(url, "video_url")
        message = err.value.message  # (the first: no such host to urllib; the second: not a video)
        assert err.value.status_code == 400 and "(query left out)" in message and host in message, message
        assert "S3CRET" not in message and "pa55word" not in message and "frag" not in message, message
    open_api.wait_for_log(r"\(query left out\)")
    assert "S3CRET" not in open_api.log_text() and "pa55word" not in open_api.log_text()


def test_a_folder_swapped_for_a_link_after_the_check_does_not_lead_out(tmp_path, monkeypatch):
    """The file a path names is checked again once opened: a folder under the media root
    replaced by a link to elsewhere between the check and the open (simulated at the open)
    is refused, and a FIFO is refused without blocking."""
    import asyncio

    from pllava_openai import media as media_module
    from pllava_openai.api_errors import ApiError
    from pllava_openai.chat_request import MediaPart

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "clips").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "clips" / "a.jpg").write_bytes(b"inside")
    (elsewhere / "a.jpg").write_bytes(b"secret")
    os.mkfifo(root / "pipe.mp4")
    loader = media_module.MediaLoader(OpenAISettings(allowed_media_root=str(root)))
    assert asyncio.run(loader.load(MediaPart("image", "clips/a.jpg"))).data == b"inside"

    real_open = os.open

    def swap_then_open(path, *args, **kwargs):
        if str(path).endswith("a.jpg") and not (root / "clips").is_symlink():
            (root / "clips" / "a.jpg").unlink()
            (root / "clips").rmdir()
            (root / "clips").symlink_to(elsewhere)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(media_module.os, "open", swap_then_open)
    with pytest.raises(ApiError, match="is not under the folder this server allows media from"):
        asyncio.run(loader.load(MediaPart("image", "clips/a.jpg")))
    with pytest.raises(ApiError, match="pipe.mp4 is not a file"):
        asyncio.run(loader.load(MediaPart("video", "pipe.mp4")))
    with pytest.raises(ApiError) as forged:  # a path with a line break cannot forge a log line
        asyncio.run(loader.load(MediaPart("video", "x.mp4\n2026-01-01 00:00:00,000 INFO forged")))
    assert "\n" not in forged.value.message and "x.mp4\\n2026" in forged.value.message


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    """A server that sends a body of 100 bytes one byte every 0.2 s (20 s in all), or for
    /headers a header line every 0.5 s (25 s in all)."""

    def do_GET(self):
        if self.path == "/headers":
            self._trickle(b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n", 50, 0.5)
        else:
            self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x", 100, 0.2)

    def _trickle(self, head: bytes, piece: bytes, count: int, pause: float) -> None:
        try:
            self.wfile.write(head)
            for _ in range(count):
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(pause)
        except OSError:  # the front end gave up
            pass

    def log_message(self, *args):
        pass


def test_a_download_is_bounded_in_all_not_per_read(decoder, logs, model_id):
    """download_timeout_s bounds the whole download: a server trickling a byte at a time never
    goes past a socket read's timeout, and used to hold the request for as long as it liked,
    in its body and (until the deadline covered connecting and headers too) in its headers."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrickleHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    answers = {}
    try:
        with start_openai(decoder.address, logs, "--allow-remote-media", "--allow-private-media-hosts",
                          "--download-timeout-s", "2") as front:
            for path in ("v.mp4", "headers"):
                url = f"http://127.0.0.1:{httpd.server_address[1]}/{path}"
                part = {"type": "video_url", "video_url": {"url": url}}
                answers[path] = post_json(front, "/v1/chat/completions", chat_body(model_id, part, max_tokens=2))
    finally:
        httpd.shutdown()
        httpd.server_close()
    for path, (status, answer) in answers.items():
        assert status == 400 and "took longer than 2 s (download_timeout_s)" in answer["error"]["message"], (
            path, answer)


def test_downloads_reach_public_hosts_only_unless_allowed(decoder, logs, model_id, media_site, open_api):
    """A request may not make the front end fetch loopback, private or link-local addresses
    (a cloud metadata service, an internal console) unless the operator allows them; a
    redirect off http(s) is not followed either."""
    part = {"type": "image_url", "image_url": {"url": f"{media_site}/still.jpg"}}
    with start_openai(decoder.address, logs, "--allow-remote-media") as front:
        status, answer = post_json(front, "/v1/chat/completions", chat_body(model_id, part, max_tokens=2))
    assert status == 400 and "127.0.0.1 is not a public address" in answer["error"]["message"], answer
    assert "allow_private_media_hosts" in answer["error"]["message"]
    to_ftp = {"type": "video_url", "video_url": {"url": f"{media_site}/to-ftp"}}
    status, answer = post_json(open_api, "/v1/chat/completions", chat_body("pllava-tiny", to_ftp, max_tokens=2),
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 400 and "a redirect from http to ftp is not followed" in answer["error"]["message"], answer


class _HeldHandler(http.server.BaseHTTPRequestHandler):
    """Holds every download (counted in ``arrived``) until ``release`` is set, then answers 404."""

    arrived: list = []
    release = threading.Event()

    def do_GET(self):
        self.arrived.append(self.path)
        self.release.wait(120)
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_health_answers_while_downloads_hang(decoder, logs, model_id):
    """40 downloads held open by their server (more than the default thread pool has threads
    on any machine up to 36 cores) take nothing from /health: it used to wait behind them
    (a liveness probe would have restarted a front end that was only busy)."""
    downloads = 40
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeldHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    part = {"type": "video_url", "video_url": {"url": f"http://127.0.0.1:{httpd.server_address[1]}/v.mp4"}}
    answers = []
    try:
        with start_openai(decoder.address, logs, "--allow-remote-media", "--allow-private-media-hosts",
                          "--download-timeout-s", "120") as front:
            body = chat_body(model_id, part, max_tokens=2)
            posts = [threading.Thread(target=lambda: answers.append(post_json(front, "/v1/chat/completions", body)))
                     for _ in range(downloads)]
            for post in posts:
                post.start()
            deadline = time.monotonic() + 60
            while len(_HeldHandler.arrived) < downloads:  # every download has started, none ended
                assert time.monotonic() < deadline, f"only {len(_HeldHandler.arrived)} of {downloads} downloads began"
                time.sleep(0.1)
            health = _http_within(f"http://{front.address}/health", 30)
            _HeldHandler.release.set()
            for post in posts:
                post.join(60)
    finally:
        _HeldHandler.release.set()
        httpd.shutdown()
        httpd.server_close()
    assert health == 200
    assert len(answers) == downloads and {status for status, _ in answers} == {400}, answers[:2]


def _http_within(url: str, timeout: float) -> int | str:
    """The status of GET ``url``, or what went wrong if no answer came within ``timeout``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return f"no answer within {timeout:g} s: {exc}"


# ---- a client that leaves, a full decoder ----------------------------------------------------------------

def test_a_client_leaving_a_stream_frees_the_decoder_slot(oa, api, decoder, model_id):
    stream = oa.chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=3000, stream=True,
                                        extra_headers={"x-request-id": "oa-leave-a"})
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    stream.close()  # drops the HTTP connection mid-stream
    assert 3 <= slot_freed(decoder, "oa-leave-a") < 3000
    # One slot: this could only run once the first request left it.
    follow = oa.chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=8,
                                        extra_headers={"x-request-id": "oa-leave-b"})
    assert follow.usage.completion_tokens == 8 and follow.id == "chatcmpl-oa-leave-b"
    log = decoder.log_text()
    assert log.index("oa-leave-a#") < log.index("[oa-leave-b] captioned")
    assert "[oa-leave-a] captioned" not in log
    assert "oa-leave-a: the client left after" in api.log_text()


def test_a_client_timing_out_frees_the_decoder_slot(api, decoder, model_id):
    openai_client(api).chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=1)  # cache it
    # 3000 tokens of the tiny model take ~3 s here (~1000 tok/s): far past the client's 1 s
    impatient = openai_client(api, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=3000,
                                          extra_headers={"x-request-id": "oa-timeout-a"})
    assert slot_freed(decoder, "oa-timeout-a") < 3000
    follow = openai_client(api).chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=4)
    assert follow.usage.completion_tokens == 4


def test_a_full_decoder_answers_429(oa, api, model_id):
    """One slot, one queue place: with a caption running and another waiting, a third is refused."""
    running = oa.chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=3000, stream=True)
    next(iter(running))  # it holds the only slot now
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(oa.chat.completions.create, model=model_id, messages=user(video_part()),
                                   max_tokens=4) for _ in range(2)]
            refused = None
            deadline = time.monotonic() + 120
            while refused is None:  # the later of the two finds the queue full
                assert time.monotonic() < deadline, api.log_tail()
                refused = next((f for f in futures if f.done()), None)
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as err:
                refused.result()
            assert err.value.status_code == 429 and err.value.code == "resource_exhausted"
            assert "max queue 1" in err.value.message
            running.close()  # frees the slot: the waiting request runs
            waiting = next(f for f in futures if f is not refused)
            assert waiting.result(timeout=120).usage.completion_tokens == 4
    finally:
        running.close()


# ---- pllava up ---------------------------------------------------------------------------------------------

def test_pllava_up_starts_the_front_end(tiny_model_dir, tmp_path):
    """``pllava up --openai-port 0``: the front end in front of the decoder, its address printed,
    its settings passed through, stopped with the rest."""
    err = open(tmp_path / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "pllava.cli", "up", "--model", str(tiny_model_dir), "--port", "0",
                           "--max-batch", "1", "--max-queue", "1", "--max-context", str(MAX_CONTEXT),
                           "--openai-port", "0", "--openai-setting", "model_name=tiny-up"],
                          stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        url = None
        for line in up.stdout:
            found = re.match(r"pllava up: OpenAI-compatible API at (http://\S+/v1)$", line.strip())
            if found:
                url = found.group(1)
                break
        assert url, "pllava up ended without printing the API's address:\n" + (tmp_path / "up.log").read_text()[-4000:]
        oa = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in oa.models.list()] == ["tiny-up"]
        answer = oa.chat.completions.create(model="tiny-up", messages=user(video_part()), max_tokens=4)
        assert answer.usage.completion_tokens == 4
        up.send_signal(signal.SIGINT)
        assert up.wait(120) == 0
        with pytest.raises(openai.APIConnectionError):
            oa.models.list()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        err.close()


def test_a_body_that_never_arrives_gives_its_place_back(decoder, logs, model_id):
    """A client that sends its headers and one byte of its body holds the only caption place
    until body_timeout_s, then gets 408, and the next request is served (it held the place
    for as long as it kept the connection open)."""
    import socket

    with start_openai(decoder.address, logs, "--max-concurrent-requests", "1", "--body-timeout-s", "2") as small:
        host, port = small.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as stalled:
            stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n{")
            answer = b""
            while b"body_timeout_s" not in answer:
                piece = stalled.recv(4096)
                assert piece, f"the connection closed after {answer!r}"
                answer += piece
            answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "within 2 s (body_timeout_s)" in answer, answer
        # A client that leaves halfway through its body is a refusal line, not an internal error.
        with socket.create_connection((host, int(port)), timeout=30) as leaving:
            leaving.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n{\"model\"")
        small.wait_for_log(r"-> 400: the client closed the connection after 8 bytes of its body")
        status, body = post_json(small, "/v1/chat/completions",
                                 chat_body(model_id, video_part(), max_tokens=2))
        assert "Traceback" not in small.log_text() and " ERROR " not in small.log_text()
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body


def test_random_bodies_are_answered_or_refused_and_never_break_the_front_end(api, decoder, model_id):
    """Hostile input at random (a fixed, reproducible set of 120, tests/hostile_requests.py):
    every body gets 200 or a 4xx with an OpenAI error object; never a 500, a hang or a dead
    front end, and no traceback in its log."""
    import hostile_requests

    def status_of(body: bytes) -> int:
        request = urllib.request.Request(f"http://{api.address}/v1/chat/completions", data=body, method="POST",
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                response.read()
                return response.status
        except urllib.error.HTTPError as exc:
            error = json.loads(exc.read())["error"]
            assert error["message"] and exc.code in (400, 404, 413, 422), (exc.code, error, body[:300])
            return exc.code

    statuses = hostile_requests.tally(hostile_requests.chat_bodies(model_id), status_of)
    assert statuses.get(200, 0) >= 3 and statuses.get(400, 0) >= 50, statuses
    assert api.alive() and decoder.alive() and "Traceback" not in api.log_text(), api.log_tail()


def caption_when_free(oa: openai.OpenAI, model_id: str):
    """A 4-token caption, asked again while the front end answers 429 (a place or body bytes
    it frees a moment after the stream before has gone), for 60 s at most."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return oa.chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=4)
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_request_bodies_in_flight_are_bounded_in_bytes(decoder, logs, model_id, media_root):
    """--max-body-bytes-in-flight 1000: a caption whose media is far larger runs (it is
    alone; its body is small, its video read from a file, which counts too); beside it a
    body of known length is refused with 429 before it is read (it is not even JSON), and a
    chunked one as soon as it passes the budget; once the caption ends, its bytes are free
    again, and a lone chunked body far over the budget is let in."""
    import socket

    with start_openai(decoder.address, logs, "--max-body-bytes-in-flight", "1000",
                      "--allowed-media-root", str(media_root)) as small:
        oa = openai_client(small)
        from_file = {"type": "video_url", "video_url": {"url": (media_root / "orbit.mp4").as_uri()}}
        running = oa.chat.completions.create(model=model_id, messages=user(from_file), max_tokens=3000,
                                             stream=True)
        try:
            next(iter(running))
            status, answer = post_json(small, "/v1/chat/completions", None, raw=b"{not json")
            assert status == 429 and answer["error"]["code"] == "resource_exhausted", answer
            assert "past max_body_bytes_in_flight (1000)" in answer["error"]["message"], answer
            host, port = small.address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=30) as chunked:
                chunked.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 1500 + b" " * 1500 + b"\r\n")
                reply = b""
                while b"max_body_bytes_in_flight" not in reply:
                    piece = chunked.recv(4096)
                    assert piece, f"the connection closed after {reply!r}"
                    reply += piece
            assert reply.startswith(b"HTTP/1.1 429"), reply
        finally:
            running.close()
        assert caption_when_free(oa, model_id).usage.completion_tokens == 4
        # Alone, a chunked body far over the budget is let in too (it was refused from its 2nd piece).
        body = json.dumps(chat_body(model_id, video_part(), max_tokens=2)).encode()
        host, port = small.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=120) as chunked:
            chunked.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                            b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            for start in range(0, len(body), 700):
                piece = body[start:start + 700]
                chunked.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            chunked.sendall(b"0\r\n\r\n")
            reply = b""
            while piece := chunked.recv(65536):
                reply += piece
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]


def test_the_front_ends_own_limit_answers_429(decoder, logs, model_id):
    with start_openai(decoder.address, logs, "--max-concurrent-requests", "1") as small:
        oa = openai_client(small)
        running = oa.chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=3000,
                                             stream=True)
        try:
            next(iter(running))
            with pytest.raises(openai.RateLimitError) as err:
                oa.chat.completions.create(model=model_id, messages=user(video_part()), max_tokens=4)
            assert "max_concurrent_requests" in err.value.message and err.value.code == "resource_exhausted"
            # refused before its body is read: a body that is not even JSON gets the 429 too
            status, answer = post_json(small, "/v1/chat/completions", None, raw=b"{not json")
            assert status == 429 and answer["error"]["code"] == "resource_exhausted", answer
        finally:
            running.close()
        # the place is free again once the stream is gone
        assert caption_when_free(oa, model_id).usage.completion_tokens == 4
