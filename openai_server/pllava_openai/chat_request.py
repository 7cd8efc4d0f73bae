"""A chat-completions request body -> :class:`ChatRequest`, or a 400 that names the field.

What is accepted (the subset of the OpenAI API a video captioner can honour):

- ``messages``: exactly one ``user`` message whose ``content`` is a list of ``text`` parts and
  exactly one media part, ``{"type": "video_url", "video_url": {"url": ...}}`` or
  ``{"type": "image_url", "image_url": {"url": ...}}``. The text parts, joined by newlines,
  are the question (none: the server's default question). System messages are refused: the
  conversation template brings its own system prompt (pick another with ``template``).
- ``max_completion_tokens`` (or the older ``max_tokens``), ``temperature``, ``top_p``,
  ``seed``, ``stop`` (a string or a list), ``stream`` and ``stream_options.include_usage``.
  Without ``temperature`` decoding is the decoder's default, greedy (not OpenAI's temperature
  1), unless ``top_p`` < 1 or ``top_k`` is given: those ask for sampling, at temperature 1.
  With ``temperature`` 0 (greedy) ``top_p`` and ``top_k`` change nothing and are dropped.
- Extra fields: ``num_frames`` (or vLLM's ``media_io_kwargs: {"video": {"num_frames": N}}``),
  ``template``, ``top_k`` (-1 or 0 = off, as in vLLM) and ``repetition_penalty``.
- ``n`` other than 1, ``logprobs``, tools, structured output (``response_format`` other than
  text, vLLM's ``guided_*``), frequency or presence penalties other than 0, and the fields of
  :data:`_NEUTRAL` (``logit_bias``, ``min_p``, ``min_tokens``, ``ignore_eos``, ``best_of``,
  ...) at values that would change the output are refused; other OpenAI fields (``user``,
  ``metadata``, ...) are ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .api_errors import bad_request

#: Content part types that carry media, and the kind of media each is.
MEDIA_PARTS = {"video_url": "video", "image_url": "image"}
_MAX_UINT32 = (1 << 32) - 1
_MAX_UINT64 = (1 << 64) - 1


@dataclass(frozen=True)
class MediaPart:
    """Where the request's video or image is: ``kind`` "video" or "image", and its URL."""

    kind: str
    url: str


@dataclass(frozen=True)
class ChatRequest:
    """One caption asked for through the chat-completions API."""

    model: str
    media: MediaPart
    prompt: str = ""  # "" = the decoder's default question
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    max_new_tokens: int = 0  # 0 = the decoder's default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_frames: int = 0  # 0 = the model's default
    template: str | None = None

    def caption_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`pllava_client.Client.caption` besides the media."""
        return dict(prompt=self.prompt, template=self.template, num_frames=self.num_frames,
                    max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed,
                    stop=self.stop)


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a decoded JSON body; raise :class:`~.api_errors.ApiError` (400) naming what is wrong."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the id GET /v1/models lists", "model")
    _refuse_unsupported(body)
    prompt, media = _parse_messages(body.get("messages"))

    stream = _optional(body, "stream", bool) or False
    options = _optional(body, "stream_options", dict)
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = _optional(options, "include_usage", bool, "stream_options.include_usage") or False

    max_new_tokens = _integer(body, "max_completion_tokens", 1, _MAX_UINT32)
    if max_new_tokens is None:
        max_new_tokens = _integer(body, "max_tokens", 1, _MAX_UINT32)
    temperature = _number(body, "temperature", low=0.0)
    top_p = _number(body, "top_p", low=0.0, high=1.0, low_open=True)
    top_k = _integer(body, "top_k", -1, _MAX_UINT32)
    if top_k == -1:  # vLLM's "off"
        top_k = None
    samples = (top_p is not None and top_p < 1) or bool(top_k)
    if temperature is None and samples:
        temperature = 1.0  # top_p or top_k alone mean sampling, at OpenAI's default temperature
    elif temperature == 0:
        top_p = top_k = None  # greedy: they change nothing (OpenAI takes them together)
    repetition_penalty = _number(body, "repetition_penalty", low=0.0, low_open=True)
    return ChatRequest(
        model=model, media=media, prompt=prompt, stream=stream, include_usage=include_usage,
        max_new_tokens=max_new_tokens or 0, temperature=temperature, top_p=top_p,
        top_k=top_k, repetition_penalty=repetition_penalty,
        seed=_integer(body, "seed", 0, _MAX_UINT64), stop=_stop(body.get("stop")),
        num_frames=_num_frames(body), template=_optional(body, "template", str) or None)


# ---- messages ------------------------------------------------------------------------------------

def _parse_messages(messages: Any) -> tuple[str, MediaPart]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object, got {_json_type(message)}", f"messages[{i}]")
        role = message.get("role")
        if role in ("system", "developer"):
            raise bad_request(f"messages[{i}]: {role} messages are not supported: the conversation template "
                              "has its own system prompt (the 'template' field picks another template)",
                              f"messages[{i}].role")
        if role != "user":
            raise bad_request(f"messages[{i}]: only one user message is supported, got a message with role "
                              f"{role!r}", f"messages[{i}].role")
    if len(messages) != 1:
        raise bad_request(f"'messages' must hold exactly one user message, got {len(messages)}", "messages")
    return _parse_content(messages[0].get("content"))


def _parse_content(content: Any) -> tuple[str, MediaPart]:
    where = "messages[0].content"
    if isinstance(content, str):
        raise bad_request(f"{where} is only text: add one video_url part (or image_url for a still image), "
                          'e.g. {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}', where)
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a list of content parts, got {_json_type(content)}", where)
    texts, media = [], []
    for i, part in enumerate(content):
        here = f"{where}[{i}]"
        if not isinstance(part, dict):
            raise bad_request(f"{here} must be an object, got {_json_type(part)}", here)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{here}.text must be a string", f"{here}.text")
            texts.append(text)
        elif kind in MEDIA_PARTS:
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise bad_request(f'{here}.{kind} must be {{"url": "..."}} with a non-empty URL', f"{here}.{kind}")
            media.append(MediaPart(MEDIA_PARTS[kind], url))
        else:
            raise bad_request(f"{here}: content parts of type {kind!r} are not supported; use text, "
                              "video_url or image_url", f"{here}.type")
    if len(media) != 1:
        raise bad_request(f"{where} must hold exactly one video_url or image_url part, got {len(media)}", where)
    return "\n".join(texts), media[0]


# ---- parameters ----------------------------------------------------------------------------------

def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request(f"'n' must be 1: one caption per request, got {n!r}", "n")
    if body.get("logprobs"):
        raise bad_request("'logprobs' is not supported", "logprobs")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(f"'{name}' is not supported: the model only writes captions", name)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name):  # (0 and null change nothing)
            raise bad_request(f"'{name}' other than 0 is not supported; 'repetition_penalty' (HF-style, 1 = off) "
                              "is", name)
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and not any(value == n and type(value) is type(n) for n in neutral):
            raise bad_request(f"'{name}' is not supported (only {' or '.join(json.dumps(n) for n in neutral)}, "
                              f"which changes nothing), got {json.dumps(value)[:100]}", name)
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        if body.get(name) is not None:
            raise bad_request(f"'{name}' is not supported: structured output is not offered", name)
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict)
                                        or response_format.get("type") != "text"):
        raise bad_request("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")


#: Fields of OpenAI's API and vLLM's that change generation in ways this server does not
#: offer, and their values that change nothing (accepted, as clients send them by default).
_NEUTRAL: dict[str, tuple] = {
    "logit_bias": ({},), "top_logprobs": (0,), "min_p": (0, 0.0), "min_tokens": (0,), "ignore_eos": (False,),
    "stop_token_ids": ([],), "bad_words": ([],), "best_of": (1,), "use_beam_search": (False,),
    "length_penalty": (1, 1.0), "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
}


def _optional(body: dict, name: str, kind: type, where: str | None = None):
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise bad_request(f"'{where or name}' must be {_TYPE_WORDS[kind]}, got {_json_type(value)}", where or name)
    return value


def _integer(body: dict, name: str, low: int, high: int, where: str | None = None) -> int | None:
    value = body.get(name)
    where = where or name
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{where}' must be an integer, got {_json_type(value)}", where)
    if not low <= value <= high:
        raise bad_request(f"'{where}' must be in {low}..{high}, got {value}", where)
    return value


def _number(body: dict, name: str, *, low: float, high: float | None = None, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{name}' must be a number, got {_json_type(value)}", name)
    if not math.isfinite(value):  # Python's JSON reads NaN and Infinity
        raise bad_request(f"'{name}' must be a finite number, got {value}", name)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise bad_request(f"'{name}' must be in {bounds}, got {value}", name)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise bad_request("'stop' must be a string or a list of strings", "stop")


def _num_frames(body: dict) -> int:
    direct = _integer(body, "num_frames", 1, _MAX_UINT32)
    io_kwargs = _optional(body, "media_io_kwargs", dict)
    nested = None
    if io_kwargs is not None:
        video = _optional(io_kwargs, "video", dict, "media_io_kwargs.video")
        if video is not None:
            nested = _integer(video, "num_frames", 1, _MAX_UINT32, "media_io_kwargs.video.num_frames")
    if direct is not None and nested is not None and direct != nested:
        raise bad_request(f"'num_frames' ({direct}) and 'media_io_kwargs.video.num_frames' ({nested}) differ",
                          "num_frames")
    return direct or nested or 0


_TYPE_WORDS = {bool: "true or false", dict: "an object", str: "a string", list: "a list"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
