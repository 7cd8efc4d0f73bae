"""Shared fixtures: a tiny random checkpoint in the llava-hf layout and the repository's
sample media."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Committed with the code (scripts/make_sample_media.py makes them): orbit.mp4 (322x182, 25 fps,
# 160 frames), portrait.mp4 (190x338, 30 fps, 300 frames), short.mp4 (250x142, 12 fps,
# 12 frames) and still.jpg (333x241).
SAMPLES = REPO / "samples"


@pytest.fixture(scope="session")
def videos_dir() -> Path:
    """The folder of sample clips and the still image, inside the repository."""
    assert (SAMPLES / "orbit.mp4").exists(), \
        f"the sample media are missing from {SAMPLES}; python scripts/make_sample_media.py makes them"
    return SAMPLES


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """``pllava make-tiny --seed 0``: 4 frames pooled to (4,12,12) = 576 visual tokens."""
    from pllava.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-pllava"), seed=0)


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory) -> Path:
    """A random LLaVA saved by transformers itself (the reference's own layout and config),
    with grouped-query attention and a 4x4 patch grid."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=16)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, rms_norm_eps=1e-5,
                       pad_token_id=0, rope_theta=10000.0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=300, vision_feature_layer=-2,
                      projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).eval()
    out = tmp_path_factory.mktemp("hf-llava")
    model.save_pretrained(out)
    return out
