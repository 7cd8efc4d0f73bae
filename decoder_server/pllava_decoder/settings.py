"""The decoder server's settings: defaults < YAML (``--config``) < ``PLLAVA_DECODER_*`` < flags."""
from __future__ import annotations

from dataclasses import dataclass

from pllava.pacing import DEFAULT_MAX_GAP_STEPS, DEFAULT_MAX_GAP_STRETCH, DEFAULT_QUEUED_WEIGHT
from pllava_serving.settings import server_problems, tls_problems

ENV_PREFIX = "PLLAVA_DECODER_"

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
    metrics_port: int = 0  # Prometheus metrics at http://HOST:PORT/metrics; 0 = off
    encoder: str = "dns:///127.0.0.1:50051"  # gRPC target of the encoder replicas (round robin)
    device: str = "CPU"  # CPU, GPU or Ascend
    device_id: int = 0
    dtype: str | None = None  # float32 / float16 / bfloat16; default by device
    lora_alpha: float = 4.0  # LoRA alpha of PEFT checkpoints (PLLaVA's inference value)
    num_frames: int | None = None  # frames per video when a request says 0; default: the checkpoint's
    max_batch: int = 8  # sequences decoded together = KV-cache slots
    max_context: int | None = None  # tokens per sequence; default: max_position_embeddings, at most 4096
    max_queue: int = 32  # requests waiting for a slot (encoding included) before RESOURCE_EXHAUSTED
    prefill_chunk: int = 256  # prompt tokens per prefill step while nothing else decodes
    prefill_small_chunk: int = 16  # prompt tails, and the shortest chunk while other streams decode
    max_gap_steps: float = DEFAULT_MAX_GAP_STEPS  # while a prompt enters, a running stream waits about this many decode steps per token at most
    small_chunk_parts: int = 2  # a shortest chunk measured longer than that wait runs in this many steps, a share of the layers each (1 = whole only)
    max_gap_stretch: float = DEFAULT_MAX_GAP_STRETCH  # up to this many times longer while prompts queue behind the one entering
    queued_weight: float = DEFAULT_QUEUED_WEIGHT  # that factor is 1 + this x prompts queued behind the one entering / streams decoding
    min_context: int = 512  # smallest context bucket; without the CPU kernels decode reads each sequence up to its bucket
    reuse_prefixes: bool = True  # a prompt starts after the leading text (before <image>) a cache slot holds; decode reads it once for all
    compile_cache: str = "~/.cache/pllava/compile"  # compiled graphs kept across restarts; "" = off
    compile_in_child: bool = True  # cold cache: compile in a child process, then load (less memory kept)
    visual_cache_bytes: int = 256 << 20  # visual tokens cached by video content; 0 disables
    encoder_timeout_s: float = 120.0  # one Encode call, the encoder's own queueing included
    encoder_retries: int = 2  # extra attempts on another replica when an encoder is UNAVAILABLE
    encoder_ready_timeout_s: float = 30.0  # longest wait for an encoder replica to be SERVING, per retry
    max_new_tokens: int = 256  # when a request leaves it at 0
    max_concurrent_rpcs: int | None = None  # RPCs of any kind held at once (more: RESOURCE_EXHAUSTED, unread); None = max_batch + max_queue + 32
    max_video_bytes: int = 64 << 20  # largest video a Caption may carry; refused before any encoder sees it
    max_prompt_chars: int = 16384  # longest question a Caption may ask, in characters (before tokenising)
    grace_s: float = 10.0  # on SIGTERM: time running streams get to finish
    tls_cert: str | None = None  # PEM certificate chain: serve TLS (with tls_key); None = plaintext
    tls_key: str | None = None  # its PEM private key, unencrypted
    tls_client_ca: str | None = None  # require client certificates signed by this CA (mutual TLS)
    auth_token_file: str | None = None  # accepted bearer tokens, one a line; None = no tokens needed
    encoder_tls_ca: str | None = None  # reach the encoders over TLS, trusting this CA; None = plaintext
    encoder_tls_cert: str | None = None  # client certificate for encoders that require one (with the key)
    encoder_tls_key: str | None = None
    encoder_token_file: str | None = None  # the encoders' bearer token: the file's first one
    log_level: str = "INFO"

    def __post_init__(self):
        problems = server_problems(self, ENV_PREFIX, {
            "max_context": 2, "num_frames": 1, "max_batch": 1, "max_queue": 1, "max_new_tokens": 1,
            "prefill_chunk": 16, "prefill_small_chunk": 16, "small_chunk_parts": 1, "min_context": 1,
            "device_id": 0, "visual_cache_bytes": 0, "encoder_retries": 0, "grace_s": 0,
            "max_video_bytes": 1, "max_concurrent_rpcs": 1, "max_prompt_chars": 1})
        if not self.encoder:
            problems.append("encoder must be a gRPC target such as dns:///encoder:50051")
        for name in ("prefill_chunk", "prefill_small_chunk"):
            if getattr(self, name) % 16:
                problems.append(f"{name} must be a multiple of 16, got {getattr(self, name)}")
        problems += tls_problems(self.encoder_tls_cert, self.encoder_tls_key, self.encoder_tls_ca,
                                 "encoder_tls_cert", "encoder_tls_key", "encoder_tls_ca")
        if self.encoder_token_file == "":
            problems.append("encoder_token_file must name a file (or be left unset)")
        if not self.max_gap_steps >= 1:  # NaN too
            problems.append(f"max_gap_steps must be >= 1 (1 = short chunks only), got {self.max_gap_steps}")
        if not self.max_gap_stretch >= 1:
            problems.append(f"max_gap_stretch must be >= 1 (1 = never longer), got {self.max_gap_stretch}")
        if not self.queued_weight >= 0:
            problems.append(f"queued_weight must be >= 0 (0 = never longer), got {self.queued_weight}")
        for name in ("encoder_timeout_s", "encoder_ready_timeout_s"):
            if not getattr(self, name) > 0:  # NaN too
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
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
