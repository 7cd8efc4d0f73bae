"""PLLaVA on HuggingFace transformers (PyTorch CPU, fp32): the benchmark's baseline.

The checkpoint is loaded as ``LlavaForConditionalGeneration`` (the llava-hf layout we write),
and PLLaVA's forward is put together from its modules in the official order:
CLIP ``hidden_states[vision_feature_layer][:, 1:]`` per frame -> linear_1 -> GELU -> linear_2
-> ``AdaptiveAvgPool3d`` to the pooled (T, h, w) grid -> the tokens replace ``<image>`` in the
prompt embeddings -> LLaMA, greedy with transformers' own KV cache (its ``cache`` argument).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


def load(model_dir) -> "torch.nn.Module":
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()  # the llava_next -> llava type note and the image_newline key
    logging.disable_progress_bar()
    return LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def visual_tokens(hf, pixels: np.ndarray, num_frames: int, pooling_shape: Sequence[int]) -> torch.Tensor:
    """(T, 3, S, S) preprocessed frames -> (t*h*w, D) pooled visual tokens."""
    layer = hf.config.vision_feature_layer
    out = hf.model.vision_tower(torch.from_numpy(np.ascontiguousarray(pixels)), output_hidden_states=True)
    x = out.hidden_states[layer][:, 1:]  # drop CLS: (T, G*G, Dv)
    if x.shape[0] < num_frames:  # a short video (or an image) is repeated to num_frames
        x = x.repeat_interleave(num_frames // x.shape[0] + 1, dim=0)[:num_frames]
    proj = hf.model.multi_modal_projector
    x = proj.linear_2(proj.act(proj.linear_1(x)))  # (T, G*G, D)
    t, hw, d = x.shape
    side = int(round(hw ** 0.5))
    x = x.reshape(1, t, side, side, d).permute(0, 4, 1, 2, 3)  # (1, D, T, G, G)
    x = torch.nn.AdaptiveAvgPool3d(tuple(pooling_shape))(x)
    return x.permute(0, 2, 3, 4, 1).reshape(-1, d)  # (t h w) order, as PLLaVA flattens


@torch.no_grad()
def embeddings(hf, prompt_ids: Sequence[int], visual) -> torch.Tensor:
    """(1, L - 1 + V, D): text embeddings with the one ``<image>`` id replaced by ``visual``."""
    ids = torch.tensor(list(prompt_ids))
    image = hf.config.image_token_index
    at = int((ids == image).nonzero()[0, 0])
    text = hf.model.language_model.embed_tokens(torch.where(ids == image, 0, ids))
    visual = torch.as_tensor(np.asarray(visual, dtype=np.float32)) if not torch.is_tensor(visual) else visual
    return torch.cat([text[:at], visual, text[at + 1:]])[None]


@dataclass
class Generation:
    """Greedy tokens of each row and where the time went (seconds)."""

    tokens: list[list[int]]
    prefill_s: float = 0.0  # prompt forward + first token
    decode_s: float = 0.0  # every later token
    step_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens(self) -> int:
        return sum(max(len(t) - 1, 0) for t in self.tokens)


@torch.no_grad()
def greedy(hf, embeds: torch.Tensor, max_new_tokens: int, eos: int | None) -> Generation:
    """Greedy decoding of a (B, L, D) batch of equal-length prompts with transformers' KV cache;
    a row stops at EOS (its later tokens are dropped; the batch runs while any row is live)."""
    lm = hf.model.language_model
    t0 = time.perf_counter()
    out = lm(inputs_embeds=embeds, use_cache=True)
    past = out.cache
    token = hf.lm_head(out.last_hidden_state[:, -1]).argmax(-1)  # (B,)
    t1 = time.perf_counter()
    gen = Generation(tokens=[[int(x)] for x in token], prefill_s=t1 - t0)
    live = [eos is None or int(x) != eos for x in token]
    while any(live) and max(len(t) for t in gen.tokens) < max_new_tokens:
        s = time.perf_counter()
        out = lm(input_ids=token[:, None], cache=past, use_cache=True)
        past = out.cache
        token = hf.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        gen.step_s.append(time.perf_counter() - s)
        for row, x in enumerate(token.tolist()):
            if live[row]:
                gen.tokens[row].append(x)
                live[row] = eos is None or x != eos
    gen.decode_s = time.perf_counter() - t1
    return gen
