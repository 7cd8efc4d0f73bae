"""VisionEncoderEngine without gRPC: parity with in-process encoding, batching, bad input,
back-pressure and video-worker crashes. Tiny checkpoint, the sample clips, real worker processes."""
from __future__ import annotations

import asyncio
import io
import multiprocessing
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
from pllava_encoder.video_workers import DecodeTimeout, VideoWorkerPool
from pllava_serving.errors import Overloaded

import odd_media
from servers import wait_until


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
    """Workers killed while idle are replaced before they get a job; a worker killed in the
    middle of a job costs that job one retry on a fresh worker, nothing more."""
    data = (videos_dir / "orbit.mp4").read_bytes()
    before = loop.run(engine.encode(data, 64))
    workers = engine.video_workers.pids
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    for pid in workers:
        wait_until(lambda: is_dead(pid))
    np.testing.assert_array_equal(loop.run(engine.encode(data, 64)).visual, before.visual)
    assert "died while idle (killed by signal 9)" in caplog.text

    async def killed_mid_job():
        task = asyncio.create_task(engine.encode(data, 64))
        while not engine.video_workers.busy_pids:
            await asyncio.sleep(0.01)
        busy = engine.video_workers.busy_pids
        for pid in busy:
            os.kill(pid, signal.SIGKILL)
        return busy, await task

    busy, after = loop.run(killed_mid_job())
    np.testing.assert_array_equal(after.visual, before.visual)
    assert f"video worker died while decoding video (killed by signal 9) (attempt 1 of 2)" in caplog.text
    wait_until(lambda: len(engine.video_workers.pids) == 2
               and not set(engine.video_workers.pids) & (set(workers) | set(busy)))


def test_an_input_that_crashes_every_worker_costs_one_worker_of_the_pool(loop, engine, videos_dir, caplog):
    """odd_media.crashing_avi() kills the process that decodes it (decord dies with SIGSEGV).
    Its retry runs on the worker started in the crashed one's place, not on the pool's other
    worker: two workers replaced, and the one that never touched the file still runs."""
    pool = engine.video_workers
    wait_until(lambda: len(pool.pids) == 2)
    before, replaced = pool.pids, pool.replaced
    with pytest.raises(VideoError, match=r"^crash\.avi: the video decoder crashed twice on this input; "
                                         r"the file is probably corrupt$"):
        loop.run(engine.encode(odd_media.crashing_avi(), 0, "crash.avi"))
    wait_until(lambda: len(pool.pids) == 2)
    assert pool.replaced - replaced == 2
    assert len(set(before) & set(pool.pids)) == 1, "the retry must not take the pool's other worker"
    assert "died while decoding crash.avi (killed by signal 11) (attempt 1 of 2)" in caplog.text
    assert "died while decoding crash.avi (killed by signal 11) (attempt 2 of 2)" in caplog.text
    assert loop.run(engine.encode((videos_dir / "short.mp4").read_bytes())).visual.shape == (576, 64)


def start_pool(loop: LoopThread, size: int = 1) -> VideoWorkerPool:
    async def start():
        return await VideoWorkerPool(size, timeout_s=120).start()
    return loop.run(start())


def test_a_caller_cancelled_while_its_dead_worker_is_examined_leaves_no_worker_lost(loop):
    """The caller goes away while the pool waits for its dead worker's exit status (the wait
    is held open here until the caller is cancelled): the worker is still replaced, and the
    next job gets the replacement instead of waiting forever for a worker."""
    pool = start_pool(loop)
    (worker,) = pool._workers
    examining, resume = threading.Event(), threading.Event()
    join = worker.process.join

    def held_join(timeout=None):
        examining.set()
        resume.wait(30)
        return join(timeout)

    worker.process.join = held_join

    async def scenario():
        job = asyncio.create_task(pool.run((os._exit, 3), "exits.mp4"))  # the worker exits: EOF, then join
        assert await asyncio.to_thread(examining.wait, 60)
        job.cancel()
        resume.set()
        with pytest.raises(asyncio.CancelledError):
            await job
        return await asyncio.wait_for(pool.run((os.getpid,)), 60)  # hangs without a replacement

    try:
        pid = loop.run(scenario())
        assert pid != worker.process.pid and pool.replaced == 1 and pool.pids == [pid] and not pool.busy_pids
    finally:
        resume.set()
        loop.run(pool.close())


def test_a_job_that_fails_unforeseen_leaves_no_worker_lost(loop):
    """A job the pipe cannot carry (a lambda cannot be pickled) fails with its own error; its
    worker, in an unknown state, is replaced rather than left busy for good."""
    pool = start_pool(loop)
    first = pool.pids

    async def scenario():
        with pytest.raises(Exception, match="pickle"):
            await pool.run((os.getpid, lambda: None), "unpicklable")
        return await asyncio.wait_for(pool.run((os.getpid,)), 60)  # hangs if the worker was lost

    try:
        pid = loop.run(scenario())
        assert pool.pids == [pid] and pid not in first and pool.replaced == 1 and not pool.busy_pids
    finally:
        loop.run(pool.close())


def test_a_pool_that_fails_to_start_leaves_no_worker_running(loop, monkeypatch):
    """One of two workers never reports ready: start() raises its error and stops the worker
    that did start (the test holds it, so its pipe does not close when the pool is dropped)."""
    from pllava_encoder import video_workers

    started, lock = [], threading.Lock()
    ready = video_workers._Worker.wait_ready

    def second_never_ready(worker, timeout):
        with lock:
            started.append(worker)
            second = len(started) == 2
        if second:
            raise TimeoutError(f"video worker {worker.name} did not start (test)")
        return ready(worker, timeout)

    monkeypatch.setattr(video_workers._Worker, "wait_ready", second_never_ready)
    with pytest.raises(TimeoutError, match=r"did not start \(test\)"):
        start_pool(loop, size=2)
    assert len(started) == 2
    wait_until(lambda: all(is_dead(worker.process.pid) for worker in started))


def test_a_worker_that_starts_while_the_pool_closes_is_stopped(loop):
    """A replacement started on a thread while close() ran (close() cannot see a worker
    not yet registered) stops itself instead of outliving the pool."""
    pool = start_pool(loop)
    loop.run(pool.close())
    children = {child.pid for child in multiprocessing.active_children()}
    with pytest.raises(RuntimeError, match="not running"):
        pool._spawn()  # what a replacement's thread runs
    late = {child.pid for child in multiprocessing.active_children()} - children
    wait_until(lambda: all(is_dead(pid) for pid in late))
    assert pool.pids == []


def is_dead(pid: int) -> bool:
    """Our child ``pid`` has ended as the pool will see it: waitable (looked at without reaping
    it, so the pool still gets its exit status), or already reaped. A "Z" in /proc is not
    enough: a killed process's main thread shows it while its other threads are still
    exiting, and until they have, the pool's is_alive() still says True."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def test_a_video_over_the_decode_budget_fails_alone_and_its_worker_is_replaced(loop, tiny_model_dir, videos_dir,
                                                                               caplog):
    """A 2 s budget: 256 frames of orbit.mp4 (about 15 s of decoding here) are stopped and
    that request fails with DecodeTimeout; still images decoded meanwhile on the other
    worker, and afterwards on the replacement, are unaffected."""
    eng = start_engine(loop, tiny_model_dir, decode_timeout_s=2.0, video_workers=2)
    orbit, still = (videos_dir / "orbit.mp4").read_bytes(), (videos_dir / "still.jpg").read_bytes()

    async def scenario():
        slow = asyncio.create_task(eng.encode(orbit, 256, "long.mp4"))
        while not eng.video_workers.busy_pids:
            await asyncio.sleep(0.01)
        overrunning = eng.video_workers.busy_pids
        meanwhile = [await eng.encode(still, 0, f"still-{i}") for i in range(3)]
        with pytest.raises(DecodeTimeout) as err:
            await slow
        afterwards = [await eng.encode(still, 0, f"after-{i}") for i in range(3)]
        return overrunning, meanwhile, err.value, afterwards

    try:
        before = eng.video_workers.pids
        overrunning, meanwhile, error, afterwards = loop.run(scenario())
        wait_until(lambda: len(eng.video_workers.pids) == 2)
        now = eng.video_workers.pids
    finally:
        loop.run(eng.close())
    assert str(error).startswith("long.mp4: decoding took longer than this encoder's budget of 2 s per video "
                                 "(decode_timeout_s), so its worker was stopped and replaced")
    assert isinstance(error, TimeoutError)  # -> DEADLINE_EXCEEDED
    for result in meanwhile + afterwards:
        np.testing.assert_array_equal(result.visual, meanwhile[0].visual)
    assert eng.video_workers.replaced == 1
    assert set(before) - set(now) == set(overrunning) and len(set(now) - set(before)) == 1  # only it was replaced
    assert "it overran the 2 s budget on long.mp4" in caplog.text


def test_frames_over_max_frame_pixels_are_refused_before_decoding(loop, tiny_model_dir, videos_dir):
    """orbit.mp4 is 322x182 = 58,604 pixels a frame, short.mp4 250x142 = 35,500; a 10000x10000
    bomb of 3 KB and a 5000x5000 PNG of 67 bytes are refused by the default limit too."""
    eng = start_engine(loop, tiny_model_dir, max_frame_pixels=50_000, video_workers=1)
    try:
        with pytest.raises(VideoError, match=r"orbit\.mp4: the video's frames are 322x182 = 58,604 pixels, over the "
                                             r"limit of 50,000 pixels per frame \(max_frame_pixels\)"):
            loop.run(eng.encode((videos_dir / "orbit.mp4").read_bytes(), 0, "orbit.mp4"))
        assert loop.run(eng.encode((videos_dir / "short.mp4").read_bytes())).visual.shape == (576, 64)
        assert eng.video_workers.replaced == 0
    finally:
        loop.run(eng.close())


@pytest.mark.parametrize("name, data, message", [
    ("bomb.mkv", odd_media.mkv_declaring(10_000, 10_000), "the video's frames are 10000x10000 = 100,000,000 pixels"),
    ("bomb.png", odd_media.png_declaring(5000, 5000), "the image is 5000x5000 = 25,000,000 pixels"),
    ("audio.mp4", odd_media.audio_only(), "has no video stream (it holds only audio)"),
    ("dot.mp4", odd_media.tiny_video(1, 1), "the video is only 1x1 pixels, too small"),
])
def test_unusual_files_are_refused_by_name(loop, engine, name, data, message):
    with pytest.raises(VideoError) as err:
        loop.run(engine.encode(data, 0, name))
    assert str(err.value).startswith(f"{name}: ") and message in str(err.value)


def _png(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_frames_of_an_extreme_aspect_ratio_are_refused_by_name(loop, engine):
    """A 200x2 strip is tiny, but the preprocessing keeps the short side at 336 pixels, so each
    frame would be resized to 33600x336 (a 2048x1 one to 688128x336): over 10:1 is refused,
    as a file and as frames sent as images; 10:1 exactly is encoded."""
    limit = "over the limit of 10:1 (the preprocessing keeps the short side at 336 pixels: 33600x336 after resizing)"
    with pytest.raises(VideoError) as err:
        loop.run(engine.encode_frames([_png(2, 200)] * 3, 0, "cam"))
    assert str(err.value).startswith(f"cam: the frames are 200x2 pixels, an aspect ratio of 100:1, {limit}")
    with pytest.raises(VideoError) as err:
        loop.run(engine.encode(_png(2, 200), 0, "strip.png"))
    assert str(err.value).startswith(f"strip.png: the image is 200x2 pixels, an aspect ratio of 100:1, {limit}")
    assert loop.run(engine.encode_frames([_png(4, 40)] * 2, 0, "ten")).visual.shape == (576, 64)


def test_frames_sent_as_images_obey_max_frame_pixels(loop, engine, videos_dir):
    still = (videos_dir / "still.jpg").read_bytes()
    with pytest.raises(VideoError) as err:
        loop.run(engine.encode_frames([still, odd_media.png_declaring(5000, 5000)], 0, "cam"))
    assert str(err.value).startswith("cam: frame 1: the image is 5000x5000 = 25,000,000 pixels, over the limit")


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
