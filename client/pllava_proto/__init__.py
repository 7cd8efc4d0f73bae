"""Generated gRPC/protobuf stubs for the PLLaVA services (see protos/ and scripts/gen_protos.py)."""
