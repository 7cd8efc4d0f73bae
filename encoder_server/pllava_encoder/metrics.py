"""The encoder's Prometheus metrics, in the registry its server owns.

The engine records each vision-tower batch and each decoded video, the servicer the bytes it
sends; gauges and the worker-restart count are read from the engine when Prometheus scrapes
(the README's "Metrics" section lists every name). Without a server, a fresh registry of its
own keeps the objects usable and isolated.

Videos and their decode times carry the label ``input``: ``video`` for a video file (or a
still image) sent whole, ``frames`` for frames the caller sampled and sent as images (their
"decode" is decoding the images, no sampling). Everything after decoding is the same for both.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pllava_serving.metrics import INPUTS, LATENCY_BUCKETS, SIZE_BUCKETS, ReadOnCollect

if TYPE_CHECKING:
    from .engine import VisionEncoderEngine


class EncoderMetrics:
    """Every metric of ``pllava-encoder`` (``pllava_encoder_*``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.batch_videos = Histogram("pllava_encoder_batch_size",
                                      "Videos in one vision-tower call (concurrent requests batched together)",
                                      buckets=SIZE_BUCKETS, registry=r)
        self.batch_frames = Histogram("pllava_encoder_batch_frames", "Frames in one vision-tower call",
                                      buckets=SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("pllava_encoder_batch_seconds",
                                       "One vision-tower call: every frame of its videos, projection and pooling",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.frames = Counter("pllava_encoder_frames",
                              "Frames through the vision tower (rate: frames per second)", registry=r)
        self.videos = Counter("pllava_encoder_videos",
                              "Videos encoded, by input: a video file (video) or frames sent as images (frames)",
                              ("input",), registry=r)
        self.video_decode_seconds = Histogram(
            "pllava_encoder_video_decode_seconds",
            "Decoding, sampling and preprocessing one video in a worker process, by input (frames: decoding "
            "and preprocessing the images sent)", ("input",), buckets=LATENCY_BUCKETS, registry=r)
        for input_kind in INPUTS:  # both series exist from the start, at 0
            self.videos.labels(input_kind)
            self.video_decode_seconds.labels(input_kind)
        self.queue_seconds = Histogram("pllava_encoder_queue_seconds",
                                       "A decoded video's wait for its vision-tower call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.visual_token_bytes_sent = Counter("pllava_encoder_visual_token_bytes_sent",
                                               "Bytes of visual-token tensors sent to decoders", registry=r)
        self.requests_in_progress = Gauge("pllava_encoder_requests_in_progress",
                                          "Encode requests held (decoding, waiting, encoding); max_queue of "
                                          "them are allowed", registry=r)
        self.videos_decoding = Gauge("pllava_encoder_videos_decoding",
                                     "Videos being decoded in the worker processes or waiting for a worker",
                                     registry=r)
        self._reader = ReadOnCollect(r)

    def watch(self, engine: "VisionEncoderEngine") -> None:
        """Read the engine's queue and its worker restarts at scrape time."""
        self.requests_in_progress.set_function(lambda: engine.requests_in_progress)
        self.videos_decoding.set_function(lambda: engine.videos_decoding)
        self._reader.add("counter", "pllava_encoder_video_workers_restarted",
                         "Video worker processes started again after one died (a crash in FFmpeg on a bad "
                         "upload kills a worker, not the server) or overran decode_timeout_s",
                         lambda: engine.workers_restarted)
        self._reader.add("gauge", "pllava_encoder_video_workers_busy",
                         "Video worker processes running a job (a job whose caller left keeps its worker until "
                         "it ends or overruns decode_timeout_s); video_workers of them exist",
                         lambda: engine.workers_busy)

    def record_batch(self, inputs: list[str], frames: int, seconds: float) -> None:
        """One vision-tower call over ``frames`` frames of videos whose inputs were ``inputs``."""
        self.batch_videos.observe(len(inputs))
        self.batch_frames.observe(frames)
        self.batch_seconds.observe(seconds)
        self.frames.inc(frames)
        for input_kind in inputs:
            self.videos.labels(input_kind).inc()
