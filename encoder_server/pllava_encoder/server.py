"""The ``pllava-encoder`` gRPC server: a thin ``pllava.v1.Encoder`` servicer around
:class:`pllava_encoder.engine.VisionEncoderEngine`.

    pllava-encoder --model DIR [--host 127.0.0.1] [--port 50051] [--device CPU] [--config FILE] ...

Start-up: bind and log ``listening on HOST:PORT`` (health NOT_SERVING), load and warm up the
vision side, then turn SERVING. Errors become status codes in
:mod:`pllava_serving.errors`; SIGTERM drains as :func:`pllava_serving.server.serve_forever`
describes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from pllava import __version__
from pllava_client.codec import encode_tensor, to_wire_dtype
from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc
from pllava_serving.errors import Unavailable, display_name
from pllava_serving.security import ServerSecurity
from pllava_serving.server import (Service, create_server, format_address, freeze_startup_heap, run_main,
                                   serve_forever)

from pllava_serving.settings import add_server_flags, concurrent_rpc_limit

from .settings import ENV_PREFIX, EncoderSettings

if TYPE_CHECKING:  # the engine (and MindSpore) is imported only when serving: video-worker
    from .engine import VisionEncoderEngine  # processes re-import this module as __mp_main__
    from .metrics import EncoderMetrics

log = logging.getLogger("pllava_encoder")


class EncoderServicer(pllava_pb2_grpc.EncoderServicer):
    """``pllava.v1.Encoder``: messages in, engine call, messages out."""

    def __init__(self, engine: "VisionEncoderEngine | None" = None, metrics: "EncoderMetrics | None" = None):
        self.engine = engine  # None while the model is loading
        self.metrics = metrics  # where the bytes sent are counted, if anywhere

    def _engine(self) -> "VisionEncoderEngine":
        if self.engine is None:
            raise Unavailable("the encoder is still loading its model; retry shortly")
        return self.engine

    async def Encode(self, request: pllava_pb2.EncodeRequest, context):
        engine, name = self._engine(), display_name(request.video_name)
        if request.WhichOneof("input") == "frames":
            result = await engine.encode_frames(request.frames.images, request.num_frames, name)
        else:
            result = await engine.encode(request.video, request.num_frames, name)
        meta, chunks = encode_tensor(result.visual)
        t = result.timings
        yield pllava_pb2.EncodeResponse(header=pllava_pb2.EncodeHeader(
            visual_tokens=meta, num_frames=result.num_frames, model_id=engine.model_id,
            timings=pllava_pb2.EncodeTimings(queue_ms=t.queue_ms, video_decode_ms=t.video_decode_ms,
                                             encode_ms=t.encode_ms, total_ms=t.total_ms)))
        for chunk in chunks:
            yield pllava_pb2.EncodeResponse(chunk=chunk)
            if self.metrics is not None:
                self.metrics.visual_token_bytes_sent.inc(len(chunk.data))

    async def GetInfo(self, request: pllava_pb2.GetInfoRequest, context) -> pllava_pb2.ModelInfo:
        engine = self._engine()
        cfg = engine.cfg
        return pllava_pb2.ModelInfo(
            model_id=engine.model_id, model_path=str(engine.model_path), model_type=cfg.model_type,
            role=pllava_pb2.SERVER_ROLE_ENCODER, dtype=to_wire_dtype(engine.dtype), device=engine.device,
            num_frames=cfg.num_frames, pooling_shape=list(cfg.pooling_shape),
            num_visual_tokens=cfg.num_visual_tokens, vision_hidden_size=cfg.vision.hidden_size,
            text_hidden_size=cfg.text.hidden_size, max_batch=engine.max_videos_per_batch,
            max_queue=engine.settings.max_queue, version=__version__)


async def serve(settings: EncoderSettings) -> None:
    """Run the server until SIGTERM/SIGINT (then drain and return)."""
    security = ServerSecurity.from_settings(settings)  # bad TLS or token files: stop before MindSpore loads
    from pllava_serving.metrics import new_registry, start_metrics_server

    from .engine import VisionEncoderEngine
    from .metrics import EncoderMetrics

    metrics = EncoderMetrics(new_registry())  # this server's own registry
    servicer = EncoderServicer(metrics=metrics)
    # A request carries the whole video (or all its frames, at most max_video_bytes too): allow
    # max_video_bytes plus room for the other fields.
    max_message = max(settings.max_video_bytes + (1 << 20), 64 << 20)
    server, port, state = await create_server(format_address(settings.host, settings.port),
                                              [Service.pllava("Encoder", servicer)], max_message_bytes=max_message,
                                              registry=metrics.registry, security=security,
                                              max_concurrent_rpcs=concurrent_rpc_limit(settings))
    await server.start()
    log.info("listening on %s", format_address(settings.host, port))
    log.info("clients: %s", security.describe())
    for warning in security.warnings():
        log.warning(warning)
    engine = exporter = None
    try:  # (reading the checkpoint's config too: a bad folder stops the server it started)
        engine = VisionEncoderEngine(settings, metrics)
        exporter = start_metrics_server(metrics.registry, settings.host, settings.metrics_port)
        await engine.start()
    except BaseException:
        await server.stop(0)
        if engine is not None:
            await engine.close()
        if exporter is not None:
            exporter.close()
        raise

    async def shut_down() -> None:
        await engine.close()
        if exporter is not None:
            exporter.close()

    servicer.engine = engine
    freeze_startup_heap()
    await state.set_serving()
    log.info("SERVING")
    await serve_forever(server, state, settings.grace_s, on_shutdown=shut_down)


def build_parser() -> argparse.ArgumentParser:
    """Every flag defaults to None (= not given), so YAML and environment values show through."""
    p = argparse.ArgumentParser(
        prog="pllava-encoder",
        description="PLLaVA vision-encoder gRPC server: videos in, pooled visual tokens out. Settings "
                    f"come from --config YAML < {ENV_PREFIX}<NAME> environment variables < these flags.")
    add_server_flags(p, EncoderSettings)
    p.add_argument("--max-num-frames", type=int, help="largest num_frames a request may ask (default 256)")
    p.add_argument("--max-frames-per-batch", type=int,
                   help="frames of concurrent videos per vision-tower call (default 64)")
    p.add_argument("--batch-wait-ms", type=float,
                   help="longest a decoded video waits for others still decoding (default 20)")
    p.add_argument("--video-workers", type=int, help="video decoding processes (default 2)")
    p.add_argument("--max-queue", type=int, help="requests held at once; more get RESOURCE_EXHAUSTED (default 32)")
    p.add_argument("--max-video-bytes", type=int,
                   help="largest video file accepted, and all frames of a request together (default 64 MiB)")
    p.add_argument("--max-image-bytes", type=int,
                   help="largest single image of frames sent as images (default 16 MiB)")
    p.add_argument("--max-frame-pixels", type=int,
                   help="largest frame, width x height as the file's header declares it, decoded; larger ones "
                        "are refused before decoding (default 16777216 = 4096x4096)")
    p.add_argument("--decode-timeout-s", type=float,
                   help="time one video may take to decode and preprocess in a worker; past it the worker is "
                        "killed and replaced and the request gets DEADLINE_EXCEEDED (default 60)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main("pllava-encoder", build_parser(), EncoderSettings, ENV_PREFIX, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
