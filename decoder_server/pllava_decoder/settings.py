"""The decoder server's settings: defaults < YAML (``--config``) < ``PLLAVA_DECODER_*`` < flags."""
from __future__ import annotations

from dataclasses import dataclass

from pllava_serving.logs import LOG_LEVELS

ENV_PREFIX = "PLLAVA_DECODER_"
DEVICES = ("CPU", "GPU", "Ascend")
DTYPES = ("float32", "float16", "bfloat16")

#: Default cap on the context when the checkpoint allows more: each KV slot preallocates
#: max_context positions, so a model's 32k window would cost 8x the memory of 4k per slot.
DEFAULT_MAX_CONTEXT_CAP = 4096


@dataclass(frozen=True)
class DecoderSettings:
    """Everything the decoder server can be told. Field names are the YAML keys; flags are the
    same names with dashes (``max_batch`` -> ``--max-batch``), environment variables
    ``PLLAVA_DECODER_`` + the upper-case name."""

    model: str | None = None  # checkpoint folder (HF layout) or converted .ckpt file; required
    host: str = "127.0.0.1"  # "0.0.0.0" in a container
    port: int = 50052  # 0 = any free port (logged as "listening on HOST:PORT")
    encoder: str = "dns:///127.0.0.1:50051"  # gRPC target of the encoder replicas (round robin)
    device: str = "CPU"  # CPU, GPU or Ascend
    device_id: int = 0
    dtype: str | None = None  # float32 / float16 / bfloat16; default by device
    lora_alpha: float = 4.0  # LoRA alpha of PEFT checkpoints (PLLaVA's inference value)
    num_frames: int | None = None  # frames per video when a request says 0; default: the checkpoint's
    max_batch: int = 8  # sequences decoded together = KV-cache slots
    max_context: int | None = None  # tokens per sequence; default: max_position_embeddings, at most 4096
    max_queue: int = 32  # requests waiting for a slot (encoding included) before RESOURCE_EXHAUSTED
    visual_cache_bytes: int = 256 << 20  # visual tokens cached by video content; 0 disables
    encoder_timeout_s: float = 120.0  # one Encode call, the encoder's own queueing included
    encoder_retries: int = 2  # extra attempts on another replica when an encoder is UNAVAILABLE
    max_new_tokens: int = 256  # when a request leaves it at 0
    grace_s: float = 10.0  # on SIGTERM: time running streams get to finish
    log_level: str = "INFO"

    def __post_init__(self):
        problems = []
        if not self.model:
            problems.append("model is required (--model DIR, PLLAVA_DECODER_MODEL or 'model:' in the YAML)")
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port}")
        if not self.encoder:
            problems.append("encoder must be a gRPC target such as dns:///encoder:50051")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.max_context is not None and self.max_context < 2:
            problems.append(f"max_context must be >= 2, got {self.max_context}")
        for name in ("num_frames",):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_batch", "max_queue", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("device_id", "visual_cache_bytes", "encoder_retries", "grace_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.encoder_timeout_s <= 0:
            problems.append(f"encoder_timeout_s must be > 0, got {self.encoder_timeout_s}")
        if problems:
            raise ValueError("invalid decoder settings: " + "; ".join(problems))

    def context_for(self, max_position_embeddings: int) -> int:
        """The KV-cache length to allocate for a model with this position limit."""
        if self.max_context is None:
            return min(max_position_embeddings, DEFAULT_MAX_CONTEXT_CAP)
        if self.max_context > max_position_embeddings:
            raise ValueError(f"max_context {self.max_context} exceeds the model's max_position_embeddings "
                             f"{max_position_embeddings}")
        return self.max_context
