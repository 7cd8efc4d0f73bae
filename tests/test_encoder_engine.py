"""VisionEncoderEngine without gRPC: parity with in-process encoding, batching, bad input,
back-pressure and video-worker crashes. Tiny checkpoint, the sample clips, real worker processes."""
from __future__ import annotations

import asyncio
import io
import os
import signal
import threading

import numpy as np
import pytest
from PIL import Image

from pllava.config import PllavaConfig, PreprocessorConfig
from pllava.model import PllavaVision
from pllava.runtime import setup_backend
from pllava.video import VideoError, load_frames, preprocess
from pllava_encoder.engine import VisionEncoderEngine
from pllava_encoder.settings import EncoderSettings
from pllava_serving.errors import Overloaded


class LoopThread:
    """An event loop on a thread of its own, so one engine serves a whole test module."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def loop():
    runner = LoopThread()
    yield runner
    runner.close()


def start_engine(loop: LoopThread, model_dir, **overrides) -> VisionEncoderEngine:
    async def start():
        return await VisionEncoderEngine(EncoderSettings(model=str(model_dir), **overrides)).start()
    return loop.run(start())


@pytest.fixture(scope="module")
def engine(loop, tiny_model_dir):
    # A long batch wait: concurrent requests always share a batch, whatever the decode times.
    eng = start_engine(loop, tiny_model_dir, batch_wait_ms=120_000, video_workers=2)
    yield eng
    loop.run(eng.close())


def in_process_tokens(model_dir, video, num_frames: int | None = None) -> np.ndarray:
    """What the in-process pipeline computes: load_frames -> preprocess -> encode_videos."""
    cfg = PllavaConfig.from_pretrained(model_dir).with_frames(num_frames)
    vision = PllavaVision.from_pretrained(model_dir, cfg, setup_backend("CPU", 0, None))
    pixels = preprocess(load_frames(video, cfg.num_frames).frames, PreprocessorConfig.from_pretrained(model_dir))
    return vision.encode_videos([pixels])[0]


def test_tokens_equal_in_process_encode_videos(loop, engine, tiny_model_dir, videos_dir):
    video = videos_dir / "orbit.mp4"
    result = loop.run(engine.encode(video.read_bytes(), 0, "orbit.mp4"))
    expected = in_process_tokens(tiny_model_dir, video)
    assert result.visual.dtype == np.float32 and result.visual.shape == (576, 64) == expected.shape
    np.testing.assert_allclose(result.visual, expected, rtol=0, atol=1e-5)
    assert result.num_frames == 4
    t = result.timings
    assert t.video_decode_ms > 0 and t.encode_ms > 0 and t.queue_ms >= 0 and t.total_ms >= t.video_decode_ms


def test_a_request_may_ask_for_more_frames(loop, engine, tiny_model_dir, videos_dir):
    video = videos_dir / "portrait.mp4"
    result = loop.run(engine.encode(video.read_bytes(), 8, "portrait.mp4"))
    expected = in_process_tokens(tiny_model_dir, video, num_frames=8)
    assert result.num_frames == 8 and result.visual.shape == expected.shape
    np.testing.assert_allclose(result.visual, expected, rtol=0, atol=1e-5)


def test_concurrent_requests_share_one_vision_tower_call(loop, engine, videos_dir):
    orbit, portrait = (videos_dir / "orbit.mp4").read_bytes(), (videos_dir / "portrait.mp4").read_bytes()
    alone = [loop.run(engine.encode(data)) for data in (orbit, portrait)]

    async def together():
        before = engine.vision_calls
        results = await asyncio.gather(engine.encode(orbit, 0, "a"), engine.encode(portrait, 0, "b"))
        return results, engine.vision_calls - before

    results, calls = loop.run(together())
    assert calls == 1, "two concurrent videos should go through the vision tower together"
    for got, single in zip(results, alone):
        np.testing.assert_allclose(got.visual, single.visual, rtol=0, atol=1e-5)
    # Mixed frame counts batch too: each video is projected and pooled with its own count.
    mixed_alone = loop.run(engine.encode(portrait, 6))

    async def mixed():
        before = engine.vision_calls
        results = await asyncio.gather(engine.encode(orbit), engine.encode(portrait, 6))
        return results, engine.vision_calls - before

    (a, b), calls = loop.run(mixed())
    assert calls == 1 and a.visual.shape == (576, 64) and b.num_frames == 6
    np.testing.assert_allclose(b.visual, mixed_alone.visual, rtol=0, atol=1e-5)


def test_a_still_image_is_one_frame_repeated(loop, engine):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(buf, "PNG")
    result = loop.run(engine.encode(buf.getvalue(), 0, "still.png"))
    assert result.num_frames == 1 and result.visual.shape == (576, 64)
    assert np.isfinite(result.visual).all()


def bad_videos(videos_dir):
    orbit = (videos_dir / "orbit.mp4").read_bytes()
    return {
        "empty": (b"", "empty (0 bytes)"),
        "random": (np.random.default_rng(1).bytes(4096), "not a recognised video or image format"),
        "truncated": (orbit[: len(orbit) // 2], "truncated"),
        "text": (b"Just some notes, not a video.\n" * 20, "looks like a text file"),
    }


@pytest.mark.parametrize("case", ["empty", "random", "truncated", "text"])
def test_bad_videos_raise_video_error_naming_the_input(loop, engine, videos_dir, case):
    data, reason = bad_videos(videos_dir)[case]
    with pytest.raises(VideoError) as err:
        loop.run(engine.encode(data, 0, f"{case}.mp4"))
    assert str(err.value).startswith(f"{case}.mp4: ") and reason in str(err.value)
    good = loop.run(engine.encode((videos_dir / "orbit.mp4").read_bytes()))  # still serving
    assert good.visual.shape == (576, 64)


@pytest.mark.parametrize("num_frames", [-1, 257, 2**32 - 1])
def test_num_frames_out_of_range_is_a_value_error(loop, engine, videos_dir, num_frames):
    with pytest.raises(ValueError, match=rf"num_frames must be between 1 and 256 .*got {num_frames}"):
        loop.run(engine.encode((videos_dir / "orbit.mp4").read_bytes(), num_frames))


def test_too_large_video_is_refused(loop, tiny_model_dir, videos_dir):
    small = start_engine(loop, tiny_model_dir, max_video_bytes=1000, video_workers=1)
    try:
        with pytest.raises(VideoError, match=r"orbit.mp4: the file is \d+ bytes, more than .*max_video_bytes=1000"):
            loop.run(small.encode((videos_dir / "orbit.mp4").read_bytes(), 0, "orbit.mp4"))
    finally:
        loop.run(small.close())


def test_beyond_max_queue_requests_are_overloaded(loop, tiny_model_dir, videos_dir):
    data = (videos_dir / "orbit.mp4").read_bytes()
    eng = start_engine(loop, tiny_model_dir, max_queue=1, video_workers=1)

    async def scenario():
        first = asyncio.create_task(eng.encode(data, 0, "first"))
        await asyncio.sleep(0)  # let it be admitted: it now waits for its video worker
        with pytest.raises(Overloaded, match=r"busy: 1 requests in progress \(max_queue=1\)"):
            await eng.encode(data, 0, "second")
        result = await first
        again = await eng.encode(data, 0, "third")  # room again once the first is done
        return result, again

    try:
        result, again = loop.run(scenario())
        np.testing.assert_array_equal(result.visual, again.visual)
    finally:
        loop.run(eng.close())


def test_a_crashed_video_worker_is_replaced(loop, engine, videos_dir, caplog):
    data = (videos_dir / "orbit.mp4").read_bytes()
    before = loop.run(engine.encode(data))
    workers = list(engine._pool._processes.values())
    assert workers
    for proc in workers:
        os.kill(proc.pid, signal.SIGKILL)
    for proc in workers:
        proc.join(30)
    after = loop.run(engine.encode(data))
    np.testing.assert_array_equal(after.visual, before.visual)
    assert "a video worker process died; starting new workers" in caplog.text
    assert all(p.pid not in {w.pid for w in workers} for p in engine._pool._processes.values())


def test_tokens_come_in_the_model_dtype(loop, engine, tiny_model_dir, videos_dir):
    """A float16 model hands out float16 tokens (what goes over the wire), close to float32's.
    (bfloat16 has no CPU matmul in MindSpore; its float32 -> bfloat16 step is exact too.)"""
    data = (videos_dir / "orbit.mp4").read_bytes()
    fp32 = loop.run(engine.encode(data)).visual
    half = start_engine(loop, tiny_model_dir, dtype="float16", video_workers=1)
    try:
        result = loop.run(half.encode(data))
    finally:
        loop.run(half.close())
    assert result.visual.dtype == np.float16 and result.visual.shape == fp32.shape
    # fp16 keeps ~3 significant digits; the tokens here reach about 10 in magnitude.
    np.testing.assert_allclose(result.visual.astype(np.float32), fp32, rtol=0, atol=5e-2)
