"""Thin Python client for the PLLaVA gRPC services (imports only grpcio, protobuf and numpy).

    from pllava_client import Client
    for piece in Client("localhost:50052").caption("video.mp4"):
        print(piece, end="", flush=True)
"""
from .client import CaptionError, CaptionResult, CaptionStream, Client

__all__ = ["CaptionError", "CaptionResult", "CaptionStream", "Client"]
