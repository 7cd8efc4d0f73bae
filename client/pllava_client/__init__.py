"""Thin Python client for the PLLaVA gRPC services (imports only grpcio, protobuf and numpy)."""
