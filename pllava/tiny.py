"""``pllava make-tiny``: a small random PLLaVA checkpoint in exactly a real checkpoint's layout.

``layout="llava-hf"`` (the default): the files and key names of
``llava-hf/llava-v1.6-vicuna-7b-hf`` plus PLLaVA's own config fields: sharded fp16
safetensors with an index, config.json, preprocessor_config.json, generation_config.json and
a LLaMA-style tokenizer.json with ``<image>`` as an added special token. ``layout="pllava"``:
``ermu2001/pllava-7b``'s, as PLLaVA's training saves it: bf16, the language model wrapped by
PEFT with LoRA on q_proj and v_proj (``base_layer`` and ``lora_A``/``lora_B.default`` keys),
no ``image_newline``, and a ``PllavaForConditionalGeneration`` config of model type "llava"
with the top-level ``vocab_size`` and ``gradient_checkpointing`` that PllavaConfig writes.
The vision geometry is the real one (336 px, 14 px patches, 24x24 grid pooled to 12x12), so
the video path and visual-token counts are those of the real model; only the widths and
depths are small. Deterministic by seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from .tiny_tokenizer import build_tiny_tokenizer
from .tokenizer import Tokenizer

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                   image_size=336, patch_size=14, projection_dim=32, layer_norm_eps=1e-5,
                   hidden_act="quick_gelu", model_type="clip_vision_model", vocab_size=32000)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, model_type="llama", pad_token_id=0, torch_dtype="float16",
                 tie_word_embeddings=False, _name_or_path="lmsys/vicuna-7b-v1.5")


#: The serving-scale preset for benchmarks: PLLaVA's real vision geometry and 16 frames, a
#: narrower CLIP and a ~220M-parameter LLaMA with Vicuna's padded vocabulary, so that memory
#: and time behave like serving (long prompts, a real vocab) on a CPU.
SERVING_VISION = dict(TINY_VISION, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=8, projection_dim=512)
SERVING_TEXT = dict(TINY_TEXT, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                    num_attention_heads=16, num_key_value_heads=16)
SERVING_VOCAB = 32064
PRESETS = {"tiny": (TINY_VISION, TINY_TEXT, None), "serving": (SERVING_VISION, SERVING_TEXT, SERVING_VOCAB)}


def tiny_config(vocab_size: int, image_token_index: int, num_frames: int = 4,
                vision: dict = TINY_VISION, text: dict = TINY_TEXT) -> dict:
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "ignore_index": -100,
        "image_token_index": image_token_index,
        "projector_hidden_act": "gelu",
        "use_image_newline_parameter": True,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "num_frames": num_frames,
        "pooling_method": "avg",
        "pooling_shape": [num_frames, 12, 12],
        "frame_shape": [24, 24],
        "use_pooling": True,
        "torch_dtype": "float16",
        "text_config": dict(text, vocab_size=vocab_size),
        "vision_config": dict(vision),
    }


PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def _tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every key of the llava-hf layout with its shape."""
    v, t = cfg["vision_config"], cfg["text_config"]
    dv, iv, dt, it = v["hidden_size"], v["intermediate_size"], t["hidden_size"], t["intermediate_size"]
    grid = v["image_size"] // v["patch_size"]
    kv = t["num_key_value_heads"] * (dt // t["num_attention_heads"])
    shapes: dict[str, tuple[int, ...]] = {}
    vm = "vision_tower.vision_model."
    shapes[vm + "embeddings.class_embedding"] = (dv,)
    shapes[vm + "embeddings.patch_embedding.weight"] = (dv, 3, v["patch_size"], v["patch_size"])
    shapes[vm + "embeddings.position_embedding.weight"] = (grid * grid + 1, dv)
    for name in ("pre_layrnorm", "post_layernorm"):
        shapes[f"{vm}{name}.weight"] = shapes[f"{vm}{name}.bias"] = (dv,)
    for i in range(v["num_hidden_layers"]):
        p = f"{vm}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (dv,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (dv, dv)
            shapes[f"{p}self_attn.{proj}.bias"] = (dv,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (iv, dv), (iv,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (dv, iv), (dv,)
    shapes["multi_modal_projector.linear_1.weight"] = (dt, dv)
    shapes["multi_modal_projector.linear_1.bias"] = (dt,)
    shapes["multi_modal_projector.linear_2.weight"] = (dt, dt)
    shapes["multi_modal_projector.linear_2.bias"] = (dt,)
    shapes["image_newline"] = (dt,)
    lm = "language_model.model."
    shapes[lm + "embed_tokens.weight"] = (t["vocab_size"], dt)
    for i in range(t["num_hidden_layers"]):
        p = f"{lm}layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (dt,)
        shapes[p + "self_attn.q_proj.weight"] = shapes[p + "self_attn.o_proj.weight"] = (dt, dt)
        shapes[p + "self_attn.k_proj.weight"] = shapes[p + "self_attn.v_proj.weight"] = (kv, dt)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (it, dt)
        shapes[p + "mlp.down_proj.weight"] = (dt, it)
    shapes[lm + "norm.weight"] = (dt,)
    shapes["language_model.lm_head.weight"] = (t["vocab_size"], dt)
    return shapes


def random_weights(cfg: dict, seed: int, scale: float = 0.2) -> dict[str, np.ndarray]:
    """Normal(0, ``scale``) matrices, ~1 for norm scales, small biases; fp16 like llava-hf."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in _tensor_shapes(cfg).items():
        if name.endswith(("layernorm.weight", "layer_norm1.weight", "layer_norm2.weight", "norm.weight",
                          "pre_layrnorm.weight", "post_layernorm.weight")):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
            value = rng.standard_normal(shape)
        else:
            value = 0.02 * rng.standard_normal(shape) if name.endswith("bias") else rng.standard_normal(shape) * scale
        out[name] = value.astype(np.float16)
    # Byte-fallback tokens (<0x00>..<0xFF>, ids 3..258) get weak output rows so random captions
    # read as words rather than strings of broken UTF-8.
    out["language_model.lm_head.weight"][3:259] *= np.float16(0.05)
    return out


def save_sharded(tensors: dict[str, np.ndarray], out_dir: Path, num_shards: int = 2) -> None:
    """Write ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``."""
    names = list(tensors)
    total = sum(t.nbytes for t in tensors.values())
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    acc = 0
    for name in names:
        shards[min(num_shards - 1, acc * num_shards // max(total, 1))].append(name)
        acc += tensors[name].nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(out_dir / fname), metadata={"format": "pt"})
        # safetensors writes its files readable by their owner only; a checkpoint is shared
        # (a container's unprivileged user reads it) like the JSON files beside it.
        (out_dir / fname).chmod(0o666 & ~_umask())
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for every
    thread a moment); 0o022 where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


#: The checkpoint layouts make_tiny writes (see the module docstring).
LAYOUTS = ("llava-hf", "pllava")
#: LoRA rank of the "pllava" layout (PLLaVA trains rank 128 on 4096-wide layers).
PLLAVA_LORA_RANK = 16


def pllava_config(cfg: dict) -> dict:
    """``cfg`` as PLLaVA's PllavaConfig saves it (transformers 4.37, bf16 training)."""
    out = {k: v for k, v in cfg.items() if k not in ("use_image_newline_parameter", "image_grid_pinpoints")}
    out.update(architectures=["PllavaForConditionalGeneration"], model_type="llava", torch_dtype="bfloat16",
               vocab_size=cfg["text_config"]["vocab_size"], gradient_checkpointing=False, pad_token_id=0,
               transformers_version="4.37.1")
    out["text_config"] = dict(cfg["text_config"], torch_dtype="bfloat16")
    return out


def peft_layout(tensors: dict[str, np.ndarray], rank: int, scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    """``tensors`` (llava-hf keys) as PLLaVA's save of a PEFT-wrapped language model: LoRA on
    q_proj and v_proj, A and B of N(0, ``scale``) (0: no delta), in each tensor's dtype."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in tensors.items():
        if not name.startswith("language_model."):
            out[name] = value
            continue
        peft = "language_model.base_model.model." + name[len("language_model."):]
        if not name.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")):
            out[peft] = value
            continue
        stem = peft[: -len(".weight")]
        out[stem + ".base_layer.weight"] = value
        out[stem + ".lora_A.default.weight"] = (rng.standard_normal((rank, value.shape[1])) * scale).astype(value.dtype)
        out[stem + ".lora_B.default.weight"] = (rng.standard_normal((value.shape[0], rank)) * scale).astype(value.dtype)
    return out


def make_tiny(out_dir: str | Path, seed: int = 0, num_frames: int = 4, preset: str = "tiny",
              layout: str = "llava-hf") -> Path:
    """Write a random checkpoint of ``preset`` ("tiny", or "serving" for benchmarks) in
    ``layout`` (:data:`LAYOUTS`) to ``out_dir`` and return it."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    vision, text, padded_vocab = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(out)
    tok = Tokenizer.from_pretrained(out)
    image_id = tok.image_token_id
    vocab = padded_vocab or -(-(image_id + 1) // 64) * 64  # llava-hf pads the vocab to a multiple of 64
    cfg = tiny_config(vocab, image_id, num_frames, vision, text)
    (out / "config.json").write_text(json.dumps(pllava_config(cfg) if layout == "pllava" else cfg, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    # wide layers get 1/sqrt(width)-sized weights so activations stay in fp16 range
    scale = 0.2 if preset == "tiny" else text["hidden_size"] ** -0.5
    tensors = random_weights(cfg, seed, scale)
    if layout == "pllava":
        del tensors["image_newline"]  # PllavaForConditionalGeneration has none
        bf16 = {name: value.astype(np.float32).astype(ml_dtypes.bfloat16) for name, value in tensors.items()}
        save_sharded(peft_layout(bf16, PLLAVA_LORA_RANK, 0.1, seed + 1), out, num_shards=3)
    else:
        save_sharded(tensors, out, num_shards=2 if preset == "tiny" else 4)
    return out
