"""Settings of the vision-encoder server.

Filled by :func:`pllava_serving.settings.load_settings`: these defaults < the YAML file given
with ``--config`` < ``PLLAVA_ENCODER_<FIELD>`` environment variables < command-line flags.
"""
from __future__ import annotations

from dataclasses import dataclass

from pllava_serving.settings import server_problems

ENV_PREFIX = "PLLAVA_ENCODER_"


@dataclass(frozen=True)
class EncoderSettings:
    """Everything the encoder server can be told. Field names are the YAML keys; flags are
    the same names with dashes (``max_queue`` -> ``--max-queue``)."""

    model: str | None = None           # checkpoint folder (HF layout) or converted .ckpt; required
    host: str = "127.0.0.1"            # interface to listen on; containers use 0.0.0.0
    port: int = 50051                  # 0 = any free port (logged as "listening on HOST:PORT")
    metrics_port: int = 0              # Prometheus metrics at http://HOST:PORT/metrics; 0 = off
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
    max_concurrent_rpcs: int | None = None  # RPCs of any kind held at once (more: RESOURCE_EXHAUSTED, unread); None = max_queue + 32
    max_video_bytes: int = 64 << 20    # largest video file accepted, and all frames of a request together
    max_image_bytes: int = 16 << 20    # largest single image of frames sent as images
    max_frame_pixels: int = 4096 * 4096  # largest frame (width x height, from the file's header) decoded
    decode_timeout_s: float = 60.0     # one video's decoding + preprocessing in a worker; then it is killed
    grace_s: float = 10.0              # on SIGTERM, time running requests get to finish
    tls_cert: str | None = None  # PEM certificate chain: serve TLS (with tls_key); None = plaintext
    tls_key: str | None = None  # its PEM private key, unencrypted
    tls_client_ca: str | None = None  # require client certificates signed by this CA (mutual TLS)
    auth_token_file: str | None = None  # accepted bearer tokens, one a line; None = no tokens needed
    log_level: str = "INFO"

    def __post_init__(self):
        problems = server_problems(self, ENV_PREFIX, {
            "device_id": 0, "batch_wait_ms": 0, "grace_s": 0, "max_num_frames": 1, "max_frames_per_batch": 1,
            "video_workers": 1, "max_queue": 1, "max_video_bytes": 1, "max_concurrent_rpcs": 1,
            "max_image_bytes": 1, "max_frame_pixels": 1})
        if not self.decode_timeout_s > 0:
            problems.append(f"decode_timeout_s must be > 0, got {self.decode_timeout_s}")
        if self.num_frames is not None and not 1 <= self.num_frames <= self.max_num_frames:
            problems.append(f"num_frames must be in 1..max_num_frames={self.max_num_frames}, got {self.num_frames}")
        if problems:
            raise ValueError("invalid encoder settings: " + "; ".join(problems))
