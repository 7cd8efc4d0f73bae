"""The front end's settings: defaults < YAML (``--config``) < ``PLLAVA_OPENAI_*`` < flags."""
from __future__ import annotations

from dataclasses import dataclass

from pllava_client.channel import MAX_MESSAGE_BYTES

from pllava_serving.logs import LOG_LEVELS
from pllava_serving.settings import tls_problems

ENV_PREFIX = "PLLAVA_OPENAI_"

#: The largest video one decoder request carries (the gRPC message limit less room for the
#: request's other fields, as :class:`pllava_client.Client` checks).
DEFAULT_MAX_MEDIA_BYTES = MAX_MESSAGE_BYTES - (64 << 10)


@dataclass(frozen=True)
class OpenAISettings:
    """Everything the front end can be told. Field names are the YAML keys; flags are the same
    names with dashes (``model_name`` -> ``--model-name``), environment variables
    ``PLLAVA_OPENAI_`` + the upper-case name."""

    decoder: str = "127.0.0.1:50052"  # gRPC target of the decoder(s), e.g. dns:///decoder:50052
    host: str = "127.0.0.1"  # "0.0.0.0" in a container
    port: int = 8000  # 0 = any free port (logged as "listening on HOST:PORT")
    model_name: str | None = None  # the model id clients name; None = the decoder's model_id
    auth_token_file: str | None = None  # accepted bearer tokens, one a line; None = no auth
    decoder_tls_ca: str | None = None  # reach the decoder over TLS, trusting this CA; None = plaintext
    decoder_tls_cert: str | None = None  # client certificate for a decoder that requires one (with the key)
    decoder_tls_key: str | None = None
    decoder_token_file: str | None = None  # the decoder's bearer token: the file's first one
    allowed_media_root: str | None = None  # file:// URLs and paths allowed under this folder; None = off
    allow_remote_media: bool = False  # download http(s) video URLs
    allow_private_media_hosts: bool = False  # downloads may reach loopback/private/link-local addresses too
    max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES  # largest video or image a request may carry
    download_timeout_s: float = 30.0  # one http(s) media download
    body_timeout_s: float = 120.0  # a request body must arrive within this (408 past it)
    caption_timeout_s: float | None = None  # deadline of one caption call; None = none
    max_concurrent_requests: int = 64  # captions in flight here before 429
    max_body_bytes_in_flight: int = 512 << 20  # request body bytes of the captions in flight before 429 (a lone one always fits)
    grace_s: float = 10.0  # on SIGTERM: time running requests get to finish
    log_level: str = "INFO"

    def __post_init__(self):
        problems = []
        if not self.decoder:
            problems.append("decoder must be a gRPC target such as 127.0.0.1:50052 or dns:///decoder:50052")
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port}")
        if self.model_name is not None and not self.model_name.strip():
            problems.append("model_name must not be empty (leave it unset for the decoder's model id)")
        for name in ("max_media_bytes", "max_concurrent_requests", "max_body_bytes_in_flight"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("download_timeout_s", "body_timeout_s", "caption_timeout_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0, got {value}")
        problems += tls_problems(self.decoder_tls_cert, self.decoder_tls_key, self.decoder_tls_ca,
                                 "decoder_tls_cert", "decoder_tls_key", "decoder_tls_ca")
        if self.decoder_token_file == "":
            problems.append("decoder_token_file must name a file (or be left unset)")
        if self.grace_s < 0:
            problems.append(f"grace_s must be >= 0, got {self.grace_s}")
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if problems:
            raise ValueError("invalid front-end settings: " + "; ".join(problems))
