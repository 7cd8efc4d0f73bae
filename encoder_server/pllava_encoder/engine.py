"""The vision encoder engine: video bytes -> pooled visual tokens, batched across requests.

No gRPC here: the servicer in :mod:`pllava_encoder.server` converts messages and calls
:meth:`VisionEncoderEngine.encode` (a video file) or :meth:`VisionEncoderEngine.encode_frames`
(frames the caller sampled, as encoded images). What happens to one request::

    encode(video, num_frames) / encode_frames(images, num_frames)   (event loop)
      -> admitted, or Overloaded when max_queue requests are already held
      -> decode + sample + preprocess in a video-worker process       (worker processes)
         (images: decode each, no sampling, the same preprocessing)
      -> its frames wait in the ready queue
      -> the batcher puts the frames of several ready videos into ONE vision-tower call,
         then projects and pools each video separately                (vision thread)
      -> EncodeResult: (num_visual_tokens, text_hidden_size) in the model dtype

Why worker processes for videos. Measured on the 2-core CI machine, decoding and
preprocessing 4 videos of 16 frames: 0.65-1.2 s serially, 0.48-0.62 s with 2 threads,
0.42-0.46 s with 2 processes. decord and PIL release the GIL, so threads would nearly do;
processes were a little faster, keep the GIL free for the event loop and the vision thread,
and above all isolate FFmpeg: a malformed upload that crashes the native decoder kills a
worker, not the server, and a video that takes longer than ``decode_timeout_s`` has its
worker killed (DEADLINE_EXCEEDED). Either way only that worker is replaced
(:mod:`pllava_encoder.video_workers`); a crashed request is retried once on a fresh worker
(the one started in the crashed one's place, never another of the pool), and a second crash
is blamed on the input (INVALID_ARGUMENT). Workers import only
``pllava.video`` and end with the server, even one killed with SIGKILL in the middle of a job
(:mod:`pllava_serving.parent_death`). Frames larger than ``max_frame_pixels`` are refused
from the container header, before any is decoded.

Why one vision thread. MindSpore is not re-entrant: every MindSpore call (loading, warm-up,
encoding) runs on one dedicated thread, one batch at a time.

Batching policy. When the vision thread is free, the batcher takes the ready videos, oldest
first, up to ``max_frames_per_batch`` frames (a longer video goes alone). If videos admitted
earlier are still decoding and the batch has room, it holds the batch open for them, but never
longer than ``batch_wait_ms`` after its oldest video became ready. An idle server with one
request therefore never waits, and concurrent requests share one vision-tower call.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import ml_dtypes
import numpy as np

from pllava.config import PllavaConfig, PreprocessorConfig
from pllava.frame_images import frames_num_frames
from pllava.model import PllavaVision
from pllava.runtime import default_dtype, setup_backend
from pllava.video import VideoError
from pllava_serving.errors import Overloaded, Unavailable
from pllava_serving.metrics import INPUT_FRAMES, INPUT_VIDEO
from pllava_serving.model_id import model_id

from . import video_worker
from .metrics import EncoderMetrics
from .settings import EncoderSettings
from .video_workers import VideoWorkerPool, WorkerDied

log = logging.getLogger(__name__)

# Model dtype name -> NumPy dtype of the visual tokens handed out (ml_dtypes has bfloat16).
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class EncoderFailure(RuntimeError):
    """The vision tower failed on a batch (not the caller's fault: INTERNAL)."""


@dataclass(frozen=True)
class EncodeTimings:
    """Where one request's time went, in milliseconds."""

    queue_ms: float          # frames ready -> their vision-tower batch started
    video_decode_ms: float   # decoding, sampling and preprocessing (in a worker)
    encode_ms: float         # the vision-tower batch it was part of
    total_ms: float          # encode() called -> result


@dataclass(frozen=True, eq=False)
class EncodeResult:
    visual: np.ndarray       # (num_visual_tokens, text_hidden_size), model dtype
    num_frames: int          # frames decoded and encoded: num_frames, 1 for a still image, or the images sent
    timings: EncodeTimings


@dataclass(eq=False)
class _Job:
    """One video whose frames are ready for the vision tower."""

    pixels: np.ndarray       # (T, 3, S, S) float32
    cfg: PllavaConfig        # this request's num_frames and pooling_shape
    future: asyncio.Future   # -> (visual, batch start, batch end)
    ready_at: float
    input_kind: str          # INPUT_VIDEO or INPUT_FRAMES, for the metrics


class VisionEncoderEngine:
    """Loads the vision side of a checkpoint and encodes videos (see the module docstring).

    ``await start()`` loads and warms up; ``await encode(...)`` from any number of
    concurrent tasks on the same event loop; ``await close()`` at the end. Also an async
    context manager doing both.
    """

    def __init__(self, settings: EncoderSettings, metrics: EncoderMetrics | None = None):
        self.settings = settings
        self.metrics = metrics if metrics is not None else EncoderMetrics()
        self.model_path = Path(settings.model)
        folder = self.model_path.parent if self.model_path.is_file() else self.model_path
        # Per-request frame counts derive from the checkpoint's own config, exactly as the
        # in-process ``pllava caption --num-frames N`` does.
        self.checkpoint_cfg = PllavaConfig.from_pretrained(folder)
        self.cfg = self.checkpoint_cfg.with_frames(settings.num_frames)  # requests with num_frames 0
        self.preprocessor = PreprocessorConfig.from_pretrained(folder, self.cfg.vision.image_size)
        self.model_id = model_id(self.model_path, settings.lora_alpha)
        self.dtype = settings.dtype or default_dtype(settings.device)
        self.device = settings.device if settings.device == "CPU" else f"{settings.device}:{settings.device_id}"
        self.vision: PllavaVision | None = None
        self.vision_calls = 0                 # vision-tower batches run (tests count them)
        self._cfgs = {self.cfg.num_frames: self.cfg}
        self._held = 0                        # admitted, not finished
        self._decoding = 0                    # admitted, frames not ready yet
        self._ready: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._vision_thread: ThreadPoolExecutor | None = None
        self.video_workers: VideoWorkerPool | None = None
        self._batcher: asyncio.Task | None = None
        self.metrics.watch(self)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> "VisionEncoderEngine":
        """Load the vision weights and warm up (on the vision thread), start the workers."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self._vision_thread = ThreadPoolExecutor(1, thread_name_prefix="vision")
        await loop.run_in_executor(self._vision_thread, self._load_and_warm_up)
        self.video_workers = await VideoWorkerPool(self.settings.video_workers,
                                                   self.settings.decode_timeout_s).start()
        self._batcher = asyncio.create_task(self._batch_loop(), name="encoder-batcher")
        log.info("vision encoder ready in %.1f s: %s on %s, %s, %d frames -> %d visual tokens of width %d",
                 time.perf_counter() - t0, self.model_path, self.device, self.dtype, self.cfg.num_frames,
                 self.cfg.num_visual_tokens, self.cfg.text.hidden_size)
        return self

    async def close(self) -> None:
        """Stop the batcher, fail whatever still waits, release the workers and the thread."""
        log.info("held at shutdown: %d requests (%d decoding, %d ready)", self._held, self._decoding,
                 len(self._ready))
        if self._batcher is not None:
            self._batcher.cancel()
            try:
                await self._batcher
            except asyncio.CancelledError:
                pass
            self._batcher = None
        while self._ready:
            job = self._ready.popleft()
            if not job.future.done():
                job.future.set_exception(Unavailable("the encoder is shutting down"))
        if self.video_workers is not None:
            await self.video_workers.close()
        if self._vision_thread is not None:
            self._vision_thread.shutdown(wait=True)

    async def __aenter__(self) -> "VisionEncoderEngine":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _load_and_warm_up(self) -> None:
        backend = setup_backend(self.settings.device, self.settings.device_id, self.dtype)
        self.vision = PllavaVision.from_pretrained(self.model_path, self.cfg, backend, self.settings.lora_alpha)
        self.vision.warm_up()
        crop_h, crop_w = self.preprocessor.crop_size
        dummy = np.zeros((self.cfg.num_frames, 3, crop_h, crop_w), dtype=np.float32)
        self._encode_batch([dummy], [self.cfg])

    @property
    def workers_restarted(self) -> int:
        """Worker processes replaced after one died or overran its time budget."""
        return self.video_workers.replaced if self.video_workers is not None else 0

    @property
    def workers_busy(self) -> int:
        """Worker processes running a job now, a job whose caller has left included."""
        return len(self.video_workers.busy_pids) if self.video_workers is not None else 0

    @property
    def requests_in_progress(self) -> int:
        """Requests admitted and not finished (``max_queue`` at most)."""
        return self._held

    @property
    def videos_decoding(self) -> int:
        """Admitted requests whose frames are not ready yet."""
        return self._decoding

    @property
    def max_videos_per_batch(self) -> int:
        """Videos of the default frame count that fit one vision-tower call."""
        return max(1, self.settings.max_frames_per_batch // self.cfg.num_frames)

    # ------------------------------------------------------------------ requests

    def resolve_num_frames(self, num_frames: int) -> int:
        """0 -> the default; anything outside 1..max_num_frames -> ValueError."""
        if num_frames == 0:
            return self.cfg.num_frames
        limit = self.settings.max_num_frames
        if not 1 <= num_frames <= limit:
            raise ValueError(f"num_frames must be between 1 and {limit} (0 = the model's default, "
                             f"{self.cfg.num_frames}), got {num_frames}")
        return int(num_frames)

    async def encode(self, video: bytes, num_frames: int = 0, name: str = "") -> EncodeResult:
        """Pooled visual tokens of one video (or still image) given as its file's bytes.

        Raises ValueError for a bad ``num_frames``, ``VideoError`` for a video that is empty,
        too large (bytes or frame pixels), truncated, not a video or not decodable,
        ``DecodeTimeout`` when decoding overran ``decode_timeout_s``, and ``Overloaded``
        when ``max_queue`` requests are already held.
        """
        start = time.perf_counter()
        name = name or "video"
        num_frames = self.resolve_num_frames(num_frames)
        if len(video) > self.settings.max_video_bytes:
            raise VideoError(f"{name}: the file is {len(video)} bytes, more than this encoder accepts "
                             f"(max_video_bytes={self.settings.max_video_bytes})")
        decode = (video_worker.decode_video, bytes(video), name, num_frames, self.preprocessor,
                  self.settings.max_frame_pixels)
        return await self._encode(decode, num_frames, name, start, INPUT_VIDEO,
                                  crashed="the video decoder crashed twice on this input; the file is probably corrupt")

    async def encode_frames(self, images: Sequence[bytes], num_frames: int = 0, name: str = "") -> EncodeResult:
        """Pooled visual tokens of frames the caller sampled, each an encoded image (JPEG, PNG,
        WebP), preprocessed exactly as a video's sampled frames are.

        ``num_frames`` is the model's frame count for them: 0 = the larger of the default
        and ``len(images)``, and never fewer than ``len(images)``
        (:func:`pllava.frame_images.frames_num_frames`). Raises ``VideoError`` for an empty
        list, too many or too large images, an image that is not a JPEG/PNG/WebP or not
        decodable, or frames of different sizes (naming the frame index), ValueError for a
        bad ``num_frames``, and ``Overloaded`` when ``max_queue`` requests are already held.
        """
        start = time.perf_counter()
        name = name or "frames"
        images = [bytes(image) for image in images]
        self.check_frame_limits(images, name)
        if num_frames:
            self.resolve_num_frames(num_frames)  # in range
        num_frames = frames_num_frames(num_frames, len(images), self.cfg.num_frames)
        decode = (video_worker.decode_frames, images, name, self.preprocessor, self.settings.max_frame_pixels)
        return await self._encode(decode, num_frames, name, start, INPUT_FRAMES,
                                  crashed="the image decoder crashed twice on these frames; an image is probably corrupt")

    def check_frame_limits(self, images: Sequence[bytes], name: str) -> None:
        """Count and size limits of frames sent as images, checked before any decoding."""
        s = self.settings
        if not images:
            raise VideoError(f"{name}: no frames (the list of images is empty); send at least one image")
        if len(images) > s.max_num_frames:
            raise VideoError(f"{name}: {len(images)} frames were sent but this encoder takes at most "
                             f"{s.max_num_frames} (max_num_frames)")
        for index, image in enumerate(images):
            if len(image) > s.max_image_bytes:
                raise VideoError(f"{name}: frame {index} is {len(image)} bytes, more than this encoder accepts "
                                 f"per image (max_image_bytes={s.max_image_bytes})")
        total = sum(len(image) for image in images)
        if total > s.max_video_bytes:
            raise VideoError(f"{name}: the {len(images)} frames are {total} bytes together, more than this encoder "
                             f"accepts (max_video_bytes={s.max_video_bytes})")

    async def _encode(self, decode: tuple, num_frames: int, name: str, start: float, input_kind: str,
                      crashed: str) -> EncodeResult:
        """Admit, run ``decode`` (a worker function and its arguments) in a worker, then wait
        for the vision tower; ``num_frames`` is the model's frame count for the result,
        ``input_kind`` what the request carried (:data:`INPUT_VIDEO` or :data:`INPUT_FRAMES`, a
        metrics label)."""
        if self._batcher is None:
            raise Unavailable("the encoder is not started")
        if self._held >= self.settings.max_queue:
            raise Overloaded(f"the encoder is busy: {self._held} requests in progress "
                             f"(max_queue={self.settings.max_queue}); retry later or on another replica")
        self._held += 1
        self._decoding += 1
        decoding = True
        try:
            pixels, decode_s = await self._decode(decode, name, crashed)
            self.metrics.video_decode_seconds.labels(input_kind).observe(decode_s)
            self._decoding -= 1
            decoding = False
            job = _Job(pixels, self._cfg_for(num_frames), asyncio.get_running_loop().create_future(),
                       time.perf_counter(), input_kind)
            self._ready.append(job)
            self._wake.set()
            visual, batch_start, batch_end = await job.future
        finally:
            if decoding:
                self._decoding -= 1
                self._wake.set()  # the batcher may be holding a batch open for this one
            self._held -= 1
        end = time.perf_counter()
        self.metrics.queue_seconds.observe(max(batch_start - job.ready_at, 0.0))
        timings = EncodeTimings(queue_ms=(batch_start - job.ready_at) * 1e3, video_decode_ms=decode_s * 1e3,
                                encode_ms=(batch_end - batch_start) * 1e3, total_ms=(end - start) * 1e3)
        log.info("%s: %d frames -> %s visual tokens (decode %.0f ms, queue %.0f ms, encode %.0f ms)",
                 name, len(pixels), visual.shape[0], timings.video_decode_ms, timings.queue_ms, timings.encode_ms)
        return EncodeResult(visual=visual, num_frames=len(pixels), timings=timings)

    def _cfg_for(self, num_frames: int) -> PllavaConfig:
        if num_frames not in self._cfgs:
            self._cfgs[num_frames] = self.checkpoint_cfg.with_frames(num_frames)
        return self._cfgs[num_frames]

    async def _decode(self, decode: tuple, name: str, crashed: str) -> tuple[np.ndarray, float]:
        """Run ``decode`` = (worker function, *arguments) in a worker process within the time
        budget; a worker that dies is replaced and the job retried once on its replacement, a
        freshly started worker (never one of the others: an input that crashes the decoder
        every time costs one worker of the pool, not two), a second death blamed on the input."""
        try:
            return await self.video_workers.run(decode, name, retry=True)
        except WorkerDied as exc:
            log.error("%s (attempt 2 of 2)", exc)
        raise VideoError(f"{name}: {crashed}")

    # ------------------------------------------------------------------ batching

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Sleep only when nothing is ready: a batch that was full leaves the other ready
            # videos behind, and their wake-up was consumed with the batch's (they would wait
            # for the next request to arrive, forever on a quiet server).
            if not self._ready:
                await self._wake.wait()
            self._wake.clear()
            self._drop_cancelled()
            if not self._ready:
                continue
            await self._hold_open()
            batch = self._take_batch()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._vision_thread, self._encode_batch,
                                                     [j.pixels for j in batch], [j.cfg for j in batch])
            except Exception as exc:
                log.exception("the vision tower failed on a batch of %d videos", len(batch))
                error = EncoderFailure(f"the vision tower failed: {type(exc).__name__}: {exc}")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            finished = time.perf_counter()
            self.metrics.record_batch([j.input_kind for j in batch], sum(len(j.pixels) for j in batch), finished - started)
            for job, visual in zip(batch, outputs):
                if not job.future.done():  # its caller may have gone away meanwhile
                    job.future.set_result((visual, started, finished))

    async def _hold_open(self) -> None:
        """Wait for videos still decoding while the batch has room, at most batch_wait_ms
        after the oldest ready video."""
        deadline = self._ready[0].ready_at + self.settings.batch_wait_ms / 1e3
        while self._decoding and self._ready_frames() < self.settings.max_frames_per_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return
            self._drop_cancelled()

    def _ready_frames(self) -> int:
        return sum(len(job.pixels) for job in self._ready)

    def _drop_cancelled(self) -> None:
        self._ready = collections.deque(job for job in self._ready if not job.future.done())

    def _take_batch(self) -> list[_Job]:
        """Oldest first, up to max_frames_per_batch frames; at least one video."""
        batch, frames = [], 0
        while self._ready:
            n = len(self._ready[0].pixels)
            if batch and frames + n > self.settings.max_frames_per_batch:
                break
            batch.append(self._ready.popleft())
            frames += n
        return batch

    def _encode_batch(self, pixels: Sequence[np.ndarray], cfgs: Sequence[PllavaConfig]) -> list[np.ndarray]:
        """On the vision thread: ONE vision-tower call over the frames of all the videos, then
        each video's projection and pooling with its own frame count."""
        self.vision_calls += 1
        # fp32 out of the model is exact for every model dtype; cast back to the model dtype.
        return [v.astype(NUMPY_DTYPES[self.dtype]) for v in self.vision.encode_videos(pixels, cfgs)]
