"""Settings of the vision-encoder server.

Filled by :func:`pllava_serving.settings.load_settings`: these defaults < the YAML file given
with ``--config`` < ``PLLAVA_ENCODER_<FIELD>`` environment variables < command-line flags.
"""
from __future__ import annotations

from dataclasses import dataclass

from pllava_serving.logs import LOG_LEVELS

ENV_PREFIX = "PLLAVA_ENCODER_"
DEVICES = ("CPU", "GPU", "Ascend")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EncoderSettings:
    """Everything the encoder server can be told. Field names are the YAML keys; flags are
    the same names with dashes (``max_queue`` -> ``--max-queue``)."""

    model: str | None = None           # checkpoint folder (HF layout) or converted .ckpt; required
    host: str = "127.0.0.1"            # interface to listen on; containers use 0.0.0.0
    port: int = 50051                  # 0 = any free port (logged as "listening on HOST:PORT")
    device: str = "CPU"                # CPU, GPU or Ascend
    device_id: int = 0                 # which device of that kind
    dtype: str | None = None           # compute and output dtype; None = by device (float32 on CPU)
    lora_alpha: float = 4.0            # LoRA alpha of PEFT checkpoints (PLLaVA's inference value)
    num_frames: int | None = None      # frames per video when a request says 0; None = checkpoint's
    max_num_frames: int = 256          # largest num_frames a request may ask for
    max_frames_per_batch: int = 64     # frames of concurrent videos encoded in one vision-tower call
    batch_wait_ms: float = 20.0        # longest a decoded video waits for others still decoding
    video_workers: int = 2             # processes decoding and preprocessing videos
    max_queue: int = 32                # requests held at once (decoding, waiting, encoding)
    max_video_bytes: int = 64 << 20    # largest video file accepted
    grace_s: float = 10.0              # on SIGTERM, time running requests get to finish
    log_level: str = "INFO"

    def __post_init__(self):
        problems = []
        if not self.model:
            problems.append("model is required (--model DIR, PLLAVA_ENCODER_MODEL or 'model:' in the YAML)")
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port}")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.num_frames is not None and not 1 <= self.num_frames <= self.max_num_frames:
            problems.append(f"num_frames must be in 1..max_num_frames={self.max_num_frames}, got {self.num_frames}")
        for name in ("device_id", "batch_wait_ms", "grace_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_num_frames", "max_frames_per_batch", "video_workers", "max_queue", "max_video_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid encoder settings: " + "; ".join(problems))
