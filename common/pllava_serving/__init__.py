"""What the PLLaVA encoder and decoder servers share: settings loading (YAML < environment <
flags), the exception -> status-code interceptor, logging, a ``grpc.aio`` server with
health, reflection and graceful shutdown, Prometheus metrics (:mod:`.metrics`: every RPC's
status, the ``/metrics`` exporter), and :mod:`.launcher` (``pllava up``: encoders and a
decoder as local processes).

Imports grpc and the generated protos, never MindSpore."""
