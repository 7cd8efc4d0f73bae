"""Config files of the three checkpoint families read into frozen dataclasses."""
from __future__ import annotations

import dataclasses
import json

import pytest

from pllava.config import ConfigError, PllavaConfig, PreprocessorConfig

LLAVA_HF = {  # llava-hf/llava-v1.6-vicuna-7b-hf, as the spec lists it
    "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next", "ignore_index": -100,
    "image_token_index": 32000, "projector_hidden_act": "gelu", "use_image_newline_parameter": True,
    "image_grid_pinpoints": [[336, 672], [672, 336]],
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "max_position_embeddings": 4096, "model_type": "llama",
                    "pad_token_id": 0, "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
}
PLLAVA = {  # ermu2001/pllava-7b family: PLLaVA's own fields on a llava config
    "architectures": ["PllavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "num_frames": 16, "pooling_method": "avg", "pooling_shape": [16, 12, 12], "frame_shape": [24, 24],
    "causal_conv_ks": [3, 3, 3], "slide_pooling_shape": [16, 2, 2],
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama"},
}


def test_llava_hf_7b_values():
    cfg = PllavaConfig.from_dict(LLAVA_HF)
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (4096, 32, 32, 32, 128)
    assert (t.intermediate_size, t.vocab_size, t.rms_norm_eps, t.rope_theta) == (11008, 32064, 1e-5, 10000.0)
    assert (t.bos_token_id, t.eos_token_id, t.tie_word_embeddings) == (1, 2, False)
    assert (v.hidden_size, v.num_hidden_layers, v.grid_size, v.hidden_act) == (1024, 24, 24, "quick_gelu")
    assert cfg.vision_layers_used == 23  # hidden_states[-2]: layer 23 of 24
    assert (cfg.num_frames, cfg.pooling_shape, cfg.num_visual_tokens) == (16, (16, 12, 12), 2304)
    assert cfg.pad_token_id == 0


def test_pllava_fields_and_defaults():
    cfg = PllavaConfig.from_dict(PLLAVA)
    assert (cfg.num_frames, cfg.pooling_shape, cfg.frame_shape) == (16, (16, 12, 12), (24, 24))
    assert cfg.vision.hidden_size == 1024 and cfg.vision.image_size == 336  # spec defaults: CLIP ViT-L/14-336
    assert cfg.text.rms_norm_eps == 1e-6  # absent: what transformers' LlamaConfig would use
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_frames = 4


def test_with_frames_follows_the_port():
    cfg = PllavaConfig.from_dict(PLLAVA)
    four = cfg.with_frames(4)
    assert (four.num_frames, four.pooling_shape, four.num_visual_tokens) == (4, (4, 12, 12), 576)
    assert cfg.with_frames(32).pooling_shape == (16, 12, 12)
    assert cfg.with_frames(8, (2, 6, 6)).num_visual_tokens == 72


def test_transformers5_rope_parameters():
    data = json.loads(json.dumps(LLAVA_HF))
    data["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert PllavaConfig.from_dict(data).text.rope_theta == 500000.0
    data["text_config"]["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0}
    with pytest.raises(ConfigError, match="llama3"):
        PllavaConfig.from_dict(data)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "qwen2_vl"}, "model_type"),
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
    ({"frame_shape": [16, 16]}, "frame_shape"),
    ({"pooling_shape": [4, 0, 12]}, "pooling_shape"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ({"vision_feature_layer": [-2, -5]}, "vision_feature_layer must be one layer index"),
    ({"multimodal_projector_bias": False}, "multimodal_projector_bias=false is not supported"),
    ({"text_config": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}}, "rope_scaling=.* is not supported"),
])
def test_unsupported_configs_fail_clearly(change, message):
    with pytest.raises(ConfigError, match=message):
        PllavaConfig.from_dict({**PLLAVA, **change})


def test_end_token_ids_follow_generation_config_then_config(tmp_path):
    from pllava.config import end_token_ids

    assert end_token_ids(tmp_path, 2) == {2}  # no files: the tokenizer's EOS
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": 7}}))
    assert end_token_ids(tmp_path, 2) == {2, 7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9, 11]}))
    assert end_token_ids(tmp_path, 2) == {2, 9, 11}  # generation_config wins, as in transformers
    for bad in ([], [2, "x"], -1, True):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ConfigError, match="generation_config.json: eos_token_id must be a token id"):
            end_token_ids(tmp_path, 2)


def test_a_partial_vision_config_is_completed_as_clip_does():
    """LLaVA's ViT-L/14-336 stands for a missing vision_config; fields a given one leaves out
    take CLIPVisionConfig's defaults, as transformers reads the file."""
    from transformers import CLIPVisionConfig

    reference = CLIPVisionConfig()
    partial = PllavaConfig.from_dict({**PLLAVA, "vision_config": {"hidden_size": 1024, "image_size": 336,
                                                                   "patch_size": 14}, "frame_shape": [24, 24]})
    v = partial.vision
    assert (v.hidden_size, v.image_size, v.patch_size) == (1024, 336, 14)
    assert (v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (
        reference.intermediate_size, reference.num_hidden_layers, reference.num_attention_heads)
    assert PllavaConfig.from_dict(PLLAVA).vision.num_hidden_layers == 24  # none given: LLaVA's tower


def test_a_default_rope_scaling_is_no_scaling():
    for rope in ({"rope_type": "default"}, {"type": "default"}, None, {}):
        assert PllavaConfig.from_dict({**PLLAVA, "text_config": {"rope_scaling": rope}}).text.rope_scaling == rope


def test_a_preprocessor_size_of_height_and_width_is_refused(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 336, "width": 336}}))
    with pytest.raises(ConfigError, match="resizes frames to exactly that size; PLLaVA resizes the shortest edge"):
        PreprocessorConfig.from_pretrained(tmp_path)


def test_missing_config_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "config.json")):
        PllavaConfig.from_pretrained(tmp_path)


def test_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}, "do_center_crop": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 0.00392156862745098, "image_processor_type": "CLIPImageProcessor"}))
    cfg = PreprocessorConfig.from_pretrained(tmp_path)
    assert cfg.shortest_edge == 336 and cfg.crop_size == (336, 336) and cfg.resample == 3
    assert PreprocessorConfig.from_pretrained(tmp_path / "nowhere") == PreprocessorConfig()
