"""The PLLaVA vision-encoder server (``pllava-encoder``): video bytes in, pooled visual tokens
out, over ``pllava.v1.Encoder``.

``settings``: :class:`EncoderSettings` (YAML < ``PLLAVA_ENCODER_*`` < flags).
``engine``: :class:`VisionEncoderEngine`, the work without gRPC (worker processes decode
videos, one thread runs the vision tower over batched frames of concurrent requests).
``video_workers``: the worker processes, each killed and replaced on its own (a crash, a
video past its time budget).
``video_worker``: what a decoding process runs (imports no MindSpore).
``metrics``: :class:`EncoderMetrics`, the Prometheus metrics in the server's own registry.
``server``: the thin servicer and ``main``.
"""
