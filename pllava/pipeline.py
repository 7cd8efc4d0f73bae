"""In-process captioning: video -> frames -> visual tokens -> prompt -> streamed caption.

A source is a video (or still image) file, or a list of encoded images: frames the caller
sampled itself, decoded and counted as :mod:`pllava.frame_images` says (as the servers do).

``Captioner`` ties the parts together for the ``pllava caption`` command and for tests. The
servers split the same steps between an encoder process and a decoder process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import weights as W
from .config import PllavaConfig, PreprocessorConfig, end_token_ids
from .frame_images import frames_num_frames, load_frame_images
from .generation import Engine, Request, SequenceStats, TokenEvent, generate
from .model import PllavaLanguage, PllavaVision
from .prompt import DEFAULT_TEMPLATE, build_prompt, default_question
from .runtime import dtype_name, setup_backend
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .video import Frames, load_frames, preprocess


@dataclass(frozen=True)
class CaptionerSettings:
    """How the in-process model runs (the servers have their own settings)."""

    device: str = "CPU"
    device_id: int = 0
    dtype: str | None = None  # default by device: float32 on CPU
    lora_alpha: float = W.DEFAULT_LORA_ALPHA
    num_frames: int | None = None  # default: the checkpoint's num_frames
    pooling_shape: tuple[int, int, int] | None = None
    max_context: int | None = None  # default: the model's max_position_embeddings
    jit: bool = True


@dataclass
class CaptionResult:
    """Everything ``pllava caption --json`` prints."""

    caption: str = ""
    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_visual_tokens: int = 0
    num_frames: int = 0
    finish_reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(caption=self.caption, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                    token_ids=self.token_ids, num_visual_tokens=self.num_visual_tokens,
                    num_frames=self.num_frames, finish_reason=self.finish_reason, timings=self.timings)


def timings_from(stats: SequenceStats, video_s: float, encode_s: float, start: float,
                 transfer_s: float = 0.0) -> dict[str, float]:
    """Millisecond timings of one request; decode tokens/s counts generated tokens after the
    first (which prefill produces). ``transfer_s``: visual tokens crossing the network (0 in
    one process)."""
    decode_s = stats.finished - stats.first_token
    decode_tokens = max(stats.generated_tokens - 1, 0)
    return {
        "video_decode_ms": video_s * 1e3,
        "encode_ms": encode_s * 1e3,
        "transfer_ms": transfer_s * 1e3,
        "queue_ms": stats.queue_s * 1e3,
        "prefill_ms": stats.prefill_s * 1e3,
        "time_to_first_token_ms": (stats.first_token - start) * 1e3,
        "decode_ms": decode_s * 1e3,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
        "total_ms": (stats.finished - start) * 1e3,
    }


class Captioner:
    """Whole PLLaVA in one process."""

    def __init__(self, model_dir: str | Path, settings: CaptionerSettings = CaptionerSettings()):
        self.model_dir = Path(model_dir)
        self.settings = settings
        folder = self.model_dir.parent if self.model_dir.is_file() else self.model_dir
        self.backend = setup_backend(settings.device, settings.device_id, settings.dtype)
        self.checkpoint_cfg = PllavaConfig.from_pretrained(folder)
        self.cfg = self.checkpoint_cfg.with_frames(settings.num_frames, settings.pooling_shape)
        self.preprocessor = PreprocessorConfig.from_pretrained(folder, self.cfg.vision.image_size)
        self.tokenizer = Tokenizer.from_pretrained(folder)
        if self.tokenizer.image_token_id != self.cfg.image_token_index:
            raise ValueError(f"tokenizer's <image> id {self.tokenizer.image_token_id} differs from config "
                             f"image_token_index {self.cfg.image_token_index}")
        self.vision = PllavaVision.from_pretrained(self.model_dir, self.cfg, self.backend, settings.lora_alpha)
        self.language = PllavaLanguage.from_pretrained(
            self.model_dir, self.cfg, self.backend, settings.lora_alpha,
            num_slots=1, max_len=settings.max_context, jit=settings.jit)
        self.engine = Engine(self.language, self.tokenizer,
                             eos_token_id=end_token_ids(folder, self.tokenizer.eos_token_id))

    @property
    def dtype(self) -> str:
        return dtype_name(self.backend.dtype)

    def encode_video(self, source) -> tuple[np.ndarray, Frames, float, float]:
        """-> (visual tokens (V, D) fp32, frames info, video seconds, encode seconds).

        ``source`` is a video or image (path, bytes, binary file) or a list of encoded frame
        images (paths or bytes), first frame first."""
        t0 = time.perf_counter()
        cfg = self.cfg
        if isinstance(source, (list, tuple)):
            images = [Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image) for image in source]
            frames = load_frame_images(images)
            count = frames_num_frames(self.settings.num_frames or 0, len(images), self.cfg.num_frames)
            cfg = self.checkpoint_cfg.with_frames(count, self.settings.pooling_shape)
        else:
            frames = load_frames(source, self.cfg.num_frames)
        pixels = preprocess(frames.frames, self.preprocessor)
        t1 = time.perf_counter()
        visual = self.vision.encode_videos([pixels], [cfg])[0]
        return visual, frames, t1 - t0, time.perf_counter() - t1

    def prompt_ids(self, question: str | None = None, template: str = DEFAULT_TEMPLATE) -> tuple[str, list[int]]:
        prompt = build_prompt(question or default_question(template), template)
        return prompt, self.tokenizer.encode(prompt)

    def caption(self, source, question: str | None = None, template: str = DEFAULT_TEMPLATE,
                params: SamplingParams = SamplingParams(), result: CaptionResult | None = None
                ) -> Iterator[str]:
        """Yield caption text pieces as tokens are generated; fill ``result`` at the end."""
        start = time.perf_counter()
        result = result if result is not None else CaptionResult()
        prompt, ids = self.prompt_ids(question, template)
        visual, frames, video_s, encode_s = self.encode_video(source)
        result.prompt, result.prompt_token_ids = prompt, ids
        result.num_visual_tokens, result.num_frames = len(visual), len(frames.frames)
        event: TokenEvent | None = None
        for event in generate(self.engine, Request(ids, visual, params)):
            if event.token_id is not None:
                result.token_ids.append(event.token_id)
            if event.text:
                result.caption += event.text
                yield event.text
        result.finish_reason = event.finish_reason.value
        result.timings = timings_from(event.stats, video_s, encode_s, start)
