"""Thin Python client for the PLLaVA gRPC services (imports only grpcio, protobuf and numpy).

    from pllava_client import Client, frame_files
    for piece in Client("localhost:50052").caption("video.mp4"):
        print(piece, end="", flush=True)
    Client("localhost:50052").caption_full(frames=frame_files("clip_frames/"))  # frames you sampled
"""
from .client import CaptionError, CaptionResult, CaptionStream, Client, RequestTooLarge
from .collection import CaptionFile, CollectionStopped, FileInUse, VideoResult, expand_inputs
from .frames import frame_files

__all__ = ["CaptionError", "CaptionFile", "CaptionResult", "CaptionStream", "Client", "CollectionStopped",
           "FileInUse", "RequestTooLarge", "VideoResult", "expand_inputs", "frame_files"]
