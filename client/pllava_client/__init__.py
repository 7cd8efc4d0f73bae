"""Thin Python client for the PLLaVA gRPC services (imports only grpcio, protobuf and numpy).

    from pllava_client import Client
    for piece in Client("localhost:50052").caption("video.mp4"):
        print(piece, end="", flush=True)
"""
from .client import CaptionError, CaptionResult, CaptionStream, Client
from .collection import CaptionFile, VideoResult, expand_inputs

__all__ = ["CaptionError", "CaptionFile", "CaptionResult", "CaptionStream", "Client", "VideoResult",
           "expand_inputs"]
