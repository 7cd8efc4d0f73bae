"""Model configuration read from a checkpoint folder's ``config.json`` and
``preprocessor_config.json``.

Absent fields take the values transformers itself would use when loading the same file
(LlamaConfig defaults for the language model; for vision, CLIPVisionConfig's defaults for the
fields a ``vision_config`` leaves out, and the CLIP ViT-L/14-336 tower that LLaVA defaults to
when there is no ``vision_config`` at all), so a checkpoint means the same thing here as in
the reference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .damaged import damage_hint

SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "pllava")


class ConfigError(ValueError):
    """A checkpoint's configuration is missing, malformed or unsupported."""


def _pick(cls, data: Mapping[str, Any], **overrides):
    """Build dataclass ``cls`` from the keys of ``data`` it knows; ignore the rest."""
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names and v is not None}
    kwargs.update(overrides)
    return cls(**kwargs)


#: transformers' CLIPVisionConfig defaults (ViT-B/32 at 224 px): what a ``vision_config``
#: that leaves a field out means. The dataclass's own defaults are LLaVA's ViT-L/14-336.
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            num_channels=3, image_size=224, patch_size=32, layer_norm_eps=1e-5,
                            hidden_act="quick_gelu")


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower hyper-parameters (HF ``CLIPVisionConfig`` names)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side: 336 / 14 = 24."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size


@dataclass(frozen=True)
class TextConfig:
    """LLaMA decoder hyper-parameters (HF ``LlamaConfig`` names and defaults)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        rope = self.rope_scaling
        if rope and (not isinstance(rope, Mapping) or set(rope) - {"rope_type", "type"}
                     or rope.get("rope_type", rope.get("type")) != "default"):
            raise ConfigError(f"rope_scaling={self.rope_scaling!r} is not supported (only the default RoPE)")
        if self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act={self.hidden_act!r} is not supported (only 'silu')")


@dataclass(frozen=True)
class PllavaConfig:
    """The whole model: vision tower, projector + 3-D pooling, language model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model_type: str = "llava"
    image_token_index: int = 32000
    pad_token_id: int = 0
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    num_frames: int = 16
    pooling_shape: tuple[int, int, int] | None = None  # absent: (num_frames, grid/2, grid/2) = (16,12,12)
    frame_shape: tuple[int, int] | None = None  # absent: the vision grid, (24, 24)
    use_pooling: bool = True
    torch_dtype: str | None = None

    def __post_init__(self):
        grid = self.vision.grid_size
        if self.frame_shape is None:
            object.__setattr__(self, "frame_shape", (grid, grid))
        if self.pooling_shape is None:
            object.__setattr__(self, "pooling_shape", (self.num_frames, max(1, grid // 2), max(1, grid // 2)))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type={self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        if self.vision_feature_select_strategy != "default":
            raise ConfigError("vision_feature_select_strategy must be 'default' (CLS dropped); "
                              f"got {self.vision_feature_select_strategy!r}")
        if self.projector_hidden_act != "gelu":
            raise ConfigError(f"projector_hidden_act={self.projector_hidden_act!r} is not supported")
        if tuple(self.frame_shape) != (self.vision.grid_size,) * 2:
            raise ConfigError(f"frame_shape={tuple(self.frame_shape)} does not match the vision grid "
                              f"{self.vision.grid_size}x{self.vision.grid_size}")
        if not self.use_pooling:
            raise ConfigError("use_pooling=False is not supported: PLLaVA always pools")
        if len(self.pooling_shape) != 3 or min(self.pooling_shape) < 1:
            raise ConfigError(f"pooling_shape must be three positive sizes, got {self.pooling_shape}")
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {self.num_frames}")
        n = self.vision.num_hidden_layers
        if isinstance(self.vision_feature_layer, bool) or not isinstance(self.vision_feature_layer, int):
            raise ConfigError(f"vision_feature_layer must be one layer index (PLLaVA reads one layer), got "
                              f"{self.vision_feature_layer!r}")
        if not -n <= self.vision_feature_layer <= n:
            raise ConfigError(f"vision_feature_layer={self.vision_feature_layer} is outside 0..{n}")
        object.__setattr__(self, "pooling_shape", tuple(int(x) for x in self.pooling_shape))
        object.__setattr__(self, "frame_shape", tuple(int(x) for x in self.frame_shape))

    @property
    def num_visual_tokens(self) -> int:
        """Tokens one video becomes: T' * H' * W' (2304 for 16x12x12)."""
        t, h, w = self.pooling_shape
        return t * h * w

    @property
    def vision_layers_used(self) -> int:
        """How many CLIP layers run: hidden_states[k] is the output of layer k (0 = embeddings)."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision.num_hidden_layers + 1 + layer

    def with_frames(self, num_frames: int | None = None,
                    pooling_shape: tuple[int, int, int] | None = None) -> "PllavaConfig":
        """Override frames sampled per video and the pooled shape (PLLaVA's loader overrides both).

        With only ``num_frames`` given, the pooled time axis becomes min(num_frames, T'), so
        4 frames on the official (16,12,12) model give (4,12,12) = 576 tokens: the MindSpore
        port's setting. PLLaVA's own loader keeps (16,12,12) whatever the frame count (4
        frames: each repeated 4 times in the pooling, 2304 tokens); pass ``pooling_shape`` for
        that.
        """
        if num_frames is None and pooling_shape is None:
            return self
        num_frames = self.num_frames if num_frames is None else int(num_frames)
        if num_frames < 1:
            raise ConfigError(f"the number of frames must be at least 1, got {num_frames}")
        if pooling_shape is None:
            t, h, w = self.pooling_shape
            pooling_shape = (min(num_frames, t), h, w)
        return replace(self, num_frames=num_frames, pooling_shape=tuple(pooling_shape))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PllavaConfig":
        text_dict = dict(data.get("text_config") or {})
        vision_dict = dict(data.get("vision_config") or {})
        if vision_dict:  # a partial vision_config is completed as CLIPVisionConfig(**it) does
            vision_dict = {**CLIP_VISION_DEFAULTS, **vision_dict}
        top_pad = data.get("pad_token_id")
        rope = text_dict.pop("rope_parameters", None)  # transformers >= 5 nests rope settings
        if isinstance(rope, Mapping):
            if rope.get("rope_type", "default") != "default":
                raise ConfigError(f"rope_parameters={dict(rope)!r}: only the default RoPE is supported")
            text_dict.setdefault("rope_theta", rope.get("rope_theta"))
        if data.get("multimodal_projector_bias") is False:
            raise ConfigError("multimodal_projector_bias=false is not supported: PLLaVA's projector has biases")
        text = _pick(TextConfig, text_dict)
        if "tie_word_embeddings" not in text_dict and "tie_word_embeddings" in data:
            text = replace(text, tie_word_embeddings=bool(data["tie_word_embeddings"]))
        pad = top_pad if top_pad is not None else (text.pad_token_id if text.pad_token_id is not None else 0)
        top = {k: v for k, v in data.items() if k not in ("text_config", "vision_config", "pad_token_id")}
        if "dtype" in top and "torch_dtype" not in top:
            top["torch_dtype"] = top["dtype"]
        if "image_token_id" in top and "image_token_index" not in top:
            top["image_token_index"] = top["image_token_id"]
        for key in ("pooling_shape", "frame_shape"):
            if key in top and top[key] is not None:
                top[key] = tuple(top[key])
        return _pick(cls, top, vision=_pick(VisionConfig, vision_dict), text=text, pad_token_id=int(pad))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "PllavaConfig":
        return cls.from_dict(_read_json(Path(model_dir) / "config.json"))


@dataclass(frozen=True)
class PreprocessorConfig:
    """CLIP image processor settings (``preprocessor_config.json``)."""

    shortest_edge: int = 336
    crop_size: tuple[int, int] = (336, 336)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    do_convert_rgb: bool = True
    resample: int = 3  # PIL.Image.BICUBIC

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessorConfig":
        data = dict(data)
        size = data.pop("size", None)
        if isinstance(size, Mapping):
            if "shortest_edge" in size:
                data["shortest_edge"] = size["shortest_edge"]
            elif "height" in size:
                raise ConfigError(f"preprocessor size={dict(size)!r} resizes frames to exactly that size; PLLaVA "
                                  "resizes the shortest edge (size: {\"shortest_edge\": 336})")
        elif isinstance(size, int):
            data["shortest_edge"] = size
        crop = data.pop("crop_size", None)
        if isinstance(crop, Mapping):
            data["crop_size"] = (int(crop["height"]), int(crop["width"]))
        elif isinstance(crop, int):
            data["crop_size"] = (crop, crop)
        for key in ("image_mean", "image_std"):
            if key in data and data[key] is not None:
                data[key] = tuple(float(x) for x in data[key])
        return _pick(cls, data)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, image_size: int | None = None) -> "PreprocessorConfig":
        """The folder's settings (the defaults without the file); ``image_size``: the vision
        tower's, which the cropped frames must match (ConfigError otherwise)."""
        path = Path(model_dir) / "preprocessor_config.json"
        cfg = cls.from_dict(_read_json(path)) if path.exists() else cls()
        if image_size is not None and tuple(cfg.crop_size) != (image_size, image_size):
            source = path if path.exists() else f"the default ({path.name} is absent)"
            raise ConfigError(f"frames are cropped to {cfg.crop_size[0]}x{cfg.crop_size[1]} ({source}), but the "
                              f"vision tower takes {image_size}x{image_size} (vision_config.image_size in "
                              f"{Path(model_dir) / 'config.json'}): set crop_size to {image_size}")
        return cfg


def end_token_ids(model_dir: str | Path, tokenizer_eos: int) -> frozenset[int]:
    """The ids that end a generation: ``eos_token_id`` of ``generation_config.json`` (one id or
    a list, as transformers' ``generate`` reads it), else of ``config.json``, and always the
    tokenizer's EOS. A checkpoint with an end-of-turn id besides ``</s>`` stops on both."""
    folder = Path(model_dir)
    ids = {int(tokenizer_eos)}
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.exists():
            continue
        data = _read_json(path)
        given = data.get("eos_token_id", (data.get("text_config") or {}).get("eos_token_id"))
        if given is None:
            continue
        listed = given if isinstance(given, list) else [given]
        if not listed or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in listed):
            raise ConfigError(f"{path}: eos_token_id must be a token id or a list of them, got {given!r}")
        return frozenset(ids | set(listed))
    return frozenset(ids)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"{path} does not exist: is {path.parent} a PLLaVA/LLaVA checkpoint folder?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}{damage_hint(path)}") from exc
