"""PLLaVA's forward pass assembled from HuggingFace transformers modules (PyTorch CPU), in the
order the official code runs it: CLIP hidden_states[layer][:, 1:] -> linear_1 -> GELU ->
linear_2 per frame -> AdaptiveAvgPool3d -> replace <image> -> LLaMA. Test-only."""
from __future__ import annotations

import numpy as np
import torch


def save_tiny_llava(folder, seed: int = 0, tie_word_embeddings: bool = False):
    """A random LLaVA saved by transformers itself (its own layout and config) into
    ``folder``: grouped-query attention, a 4x4 patch grid. -> folder"""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=16)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, rms_norm_eps=1e-5,
                       pad_token_id=0, rope_theta=10000.0, tie_word_embeddings=tie_word_embeddings)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=300, vision_feature_layer=-2,
                      projector_hidden_act="gelu", tie_word_embeddings=tie_word_embeddings)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(folder)
    return folder


def load_hf(model_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def clip_features(hf, pixel_values: np.ndarray) -> np.ndarray:
    layer = hf.config.vision_feature_layer
    out = hf.model.vision_tower(torch.from_numpy(pixel_values), output_hidden_states=True)
    return out.hidden_states[layer][:, 1:].numpy()


@torch.no_grad()
def project_and_pool(hf, features: np.ndarray, num_frames: int, pooling_shape) -> np.ndarray:
    """PllavaMultiModalProjector.forward for one video (frames repeated when short)."""
    x = torch.from_numpy(features)
    t = x.shape[0]
    if t < num_frames:
        x = x.repeat_interleave(int(num_frames / t) + 1, dim=0)[:num_frames]
    proj = hf.model.multi_modal_projector
    x = proj.linear_2(proj.act(proj.linear_1(x)))  # (T, hw, D)
    t, hw, d = x.shape
    side = int(round(hw ** 0.5))
    x = x.reshape(1, t, side, side, d).permute(0, 4, 1, 2, 3)  # (1, D, T, h, w)
    x = torch.nn.AdaptiveAvgPool3d(tuple(pooling_shape))(x)
    return x.permute(0, 2, 3, 4, 1).reshape(-1, d).numpy()  # (t h w) order


@torch.no_grad()
def merged_embeddings(hf, input_ids, visual: np.ndarray) -> torch.Tensor:
    ids = torch.tensor(input_ids)
    image = hf.config.image_token_index
    pos = int((ids == image).nonzero()[0, 0])
    text = hf.model.language_model.embed_tokens(torch.where(ids == image, 0, ids))
    return torch.cat([text[:pos], torch.from_numpy(visual), text[pos + 1:]])[None]


@torch.no_grad()
def logits(hf, embeds: torch.Tensor) -> np.ndarray:
    hidden = hf.model.language_model(inputs_embeds=embeds).last_hidden_state
    return hf.lm_head(hidden)[0].float().numpy()


@torch.no_grad()
def greedy(hf, embeds: torch.Tensor, max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy decoding with HF's own KV cache."""
    out = hf.model.language_model(inputs_embeds=embeds, use_cache=True)
    past = out.cache
    token = int(hf.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
    tokens = [token]
    while len(tokens) < max_new_tokens and token != eos:
        out = hf.model.language_model(input_ids=torch.tensor([[token]]), cache=past, use_cache=True)
        past = out.cache
        token = int(hf.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
        tokens.append(token)
    return tokens
