"""What the PLLaVA encoder and decoder servers share: settings loading (YAML < environment <
flags), the exception -> status-code interceptor, logging, and a ``grpc.aio`` server with
health, reflection and graceful shutdown.

Imports grpc and the generated protos, never MindSpore."""
