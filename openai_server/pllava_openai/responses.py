"""The objects the API answers with: ``chat.completion``, ``chat.completion.chunk`` (as
server-sent events) and ``usage``.

``usage.prompt_tokens`` counts what the model read: the prompt's text tokens with the image
placeholder replaced by the video's visual tokens (``len(prompt_token_ids) - 1 +
num_visual_tokens``), ``prompt_tokens_details.cached_tokens`` how many of those the decoder
found in its KV cache (the leading text an earlier prompt shared); ``completion_tokens`` the
generated tokens.
"""
from __future__ import annotations

import json

from pllava_client import CaptionResult

#: The decoder's finish reasons in OpenAI's words.
FINISH_REASONS = {"stop": "stop", "stop_string": "stop", "length": "length", "context_length": "length"}

#: The event that ends a stream.
DONE_EVENT = "data: [DONE]\n\n"


def finish_reason(result: CaptionResult) -> str:
    return FINISH_REASONS.get(result.finish_reason, "stop")


def usage(result: CaptionResult) -> dict:
    prompt = max(0, len(result.prompt_token_ids) - 1) + result.num_visual_tokens
    completion = len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": result.num_prompt_tokens_reused}}


def completion(completion_id: str, created: int, model: str, result: CaptionResult) -> dict:
    """The whole answer of a request without ``stream``."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.caption},
                     "logprobs": None, "finish_reason": finish_reason(result)}],
        "usage": usage(result),
    }


def chunk(completion_id: str, created: int, model: str, delta: dict, reason: str | None = None) -> dict:
    """One ``chat.completion.chunk`` with one choice."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def usage_chunk(completion_id: str, created: int, model: str, result: CaptionResult) -> dict:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage(result)}


def event(data: dict) -> str:
    """One server-sent event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
