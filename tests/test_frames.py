"""Frames sent by the caller instead of a video, for real: encoder and decoder subprocesses on
127.0.0.1, the tiny checkpoint, raw gRPC stubs, the public client and ``pllava-caption``.

The frames are the ones pllava.video itself samples from the sample clips, written as PNG
(lossless), so the encoder must turn them into exactly the visual tokens of the video.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from pllava.video import load_frames
from pllava_client import CaptionError, Client
from pllava_client.channel import channel_options
from pllava_client.codec import TensorAssembler
from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc
from servers import console_script, start_decoder, start_encoder

CONTEXT = 1024
MAX_IMAGE_BYTES = 200_000    # the PNG frames of the samples are 80-95 kB each
MAX_VIDEO_BYTES = 1_000_000  # portrait.mp4 is 348 kB, its 8 PNG frames 742 kB


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def sampled_pngs(video: Path, num_frames: int) -> list[bytes]:
    """The frames pllava.video samples from ``video``, each as a PNG file's bytes."""
    return [png(frame) for frame in load_frames(video, num_frames).frames]


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("frames-logs")


@pytest.fixture(scope="module")
def encoder(tiny_model_dir, logs):
    args = ["--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-video-bytes", str(MAX_VIDEO_BYTES)]
    with start_encoder(tiny_model_dir, extra_args=args, log_dir=logs) as server:
        yield server
        assert server.alive(), server.log_tail()


@pytest.fixture(scope="module")
def stub(encoder):
    with grpc.insecure_channel(encoder.address, options=channel_options()) as channel:
        yield pllava_pb2_grpc.EncoderStub(channel)


@pytest.fixture(scope="module")
def decoder(tiny_model_dir, encoder, logs):
    with start_decoder(tiny_model_dir, f"dns:///127.0.0.1:{encoder.port}", logs,
                       "--max-context", str(CONTEXT)) as server:
        yield server
        assert server.alive(), server.log_tail()


@pytest.fixture(scope="module")
def orbit_pngs(videos_dir) -> list[bytes]:
    return sampled_pngs(videos_dir / "orbit.mp4", 4)  # the tiny model's num_frames


@pytest.fixture(scope="module")
def frames_dir(orbit_pngs, tmp_path_factory) -> Path:
    """orbit.mp4's 4 sampled frames as frame_0008.png ... frame_0011.png, plus a file that is
    not a frame (ignored)."""
    folder = tmp_path_factory.mktemp("orbit-frames")
    for i, data in enumerate(orbit_pngs):
        (folder / f"frame_{i + 8:04d}.png").write_bytes(data)
    (folder / "README.txt").write_text("frames of orbit.mp4\n")
    return folder


def encode(stub, **fields):
    """Call Encode; return (header, tensor)."""
    responses = stub.Encode(pllava_pb2.EncodeRequest(**fields), timeout=120)
    first = next(responses)
    assert first.WhichOneof("payload") == "header"
    assembler = TensorAssembler(first.header.visual_tokens)
    for response in responses:
        assembler.add(response.chunk)
    return first.header, assembler.finish()


def frames(images) -> pllava_pb2.Frames:
    return pllava_pb2.Frames(images=list(images))


def encoded_ids(encoder) -> set[str]:
    """Request ids the encoder logged an encoded video for."""
    return set(re.findall(r"\[([^\]]+)\] .*-> \d+ visual tokens", encoder.log_text()))


# ---- the encoder ---------------------------------------------------------------------------------

def test_frames_give_the_visual_tokens_of_the_video(stub, videos_dir, orbit_pngs):
    video_header, video_tokens = encode(stub, video=(videos_dir / "orbit.mp4").read_bytes())
    frames_header, frames_tokens = encode(stub, frames=frames(orbit_pngs), video_name="orbit-frames")
    assert frames_tokens.shape == video_tokens.shape == (576, 64)
    np.testing.assert_array_equal(frames_tokens, video_tokens)
    assert frames_header.num_frames == video_header.num_frames == 4
    assert frames_header.model_id == video_header.model_id
    assert frames_header.timings.video_decode_ms > 0 and frames_header.timings.encode_ms > 0


def test_more_frames_than_the_default_equal_a_video_sampled_with_that_many(stub, videos_dir):
    portrait = videos_dir / "portrait.mp4"
    video_header, video_tokens = encode(stub, video=portrait.read_bytes(), num_frames=8)
    frames_header, frames_tokens = encode(stub, frames=frames(sampled_pngs(portrait, 8)))  # num_frames 0
    np.testing.assert_array_equal(frames_tokens, video_tokens)
    assert frames_header.num_frames == video_header.num_frames == 8


def test_one_frame_gives_the_tokens_of_the_same_still_image(stub, videos_dir):
    still = videos_dir / "still.jpg"
    image_header, image_tokens = encode(stub, video=still.read_bytes())
    one = png(load_frames(still, 4).frames[0])  # the decoded still, losslessly re-encoded
    frame_header, frame_tokens = encode(stub, frames=frames([one]))
    np.testing.assert_array_equal(frame_tokens, image_tokens)  # repeated to 4 frames in both
    assert frame_header.num_frames == image_header.num_frames == 1
    # ... and num_frames picks the model's frame count for them, as for a still image
    _, eight = encode(stub, frames=frames([one]), num_frames=8)
    _, image_eight = encode(stub, video=still.read_bytes(), num_frames=8)
    np.testing.assert_array_equal(eight, image_eight)


def bad_encode_requests(orbit_pngs, portrait_pngs):
    noise = np.random.default_rng(0).bytes(4096)
    small = png(load_frames(io.BytesIO(orbit_pngs[0]), 1).frames[0][:90])
    return {
        "empty list": (dict(frames=frames([]), video_name="clip"),
                       r"^clip: no frames \(the list of images is empty\); send at least one image$"),
        "bad image bytes": (dict(frames=frames([orbit_pngs[0], orbit_pngs[1], noise]), video_name="clip"),
                            r"^clip: frame 2: not a JPEG, PNG or WebP image"),
        "corrupt png": (dict(frames=frames([orbit_pngs[0], orbit_pngs[1][:30000]])),
                        r"^frames: frame 1: could not be read as an image; it may be corrupt or truncated"),
        "empty image": (dict(frames=frames([orbit_pngs[0], b""])), r"^frames: frame 1: the image is empty"),
        "too many frames": (dict(frames=frames([orbit_pngs[0]] * 257)),
                            r"^frames: 257 frames were sent but this encoder takes at most 256 \(max_num_frames\)$"),
        "mixed sizes": (dict(frames=frames([orbit_pngs[0], orbit_pngs[1], small]), video_name="clip"),
                        r"^clip: frame 2 is 322x90 but frame 0 is 322x182; all frames must have the same size"),
        "num_frames below the frames sent": (dict(frames=frames(orbit_pngs), num_frames=2),
                                             r"num_frames is 2 but 4 frames were sent; .* at least 4"),
        "num_frames beyond the limit": (dict(frames=frames(orbit_pngs), num_frames=300),
                                        r"num_frames must be between 1 and 256"),
        "an image too large": (dict(frames=frames([orbit_pngs[0], bytes(MAX_IMAGE_BYTES + 1)])),
                               rf"^frames: frame 1 is {MAX_IMAGE_BYTES + 1} bytes, more than this encoder accepts per "
                               rf"image \(max_image_bytes={MAX_IMAGE_BYTES}\)$"),
        "too many bytes together": (dict(frames=frames(portrait_pngs + portrait_pngs[:3])),
                                    rf"^frames: the 11 frames are \d+ bytes together, more than this encoder accepts "
                                    rf"\(max_video_bytes={MAX_VIDEO_BYTES}\)$"),
    }


@pytest.fixture(scope="module")
def portrait_pngs(videos_dir) -> list[bytes]:
    return sampled_pngs(videos_dir / "portrait.mp4", 8)


@pytest.mark.parametrize("case", ["empty list", "bad image bytes", "corrupt png", "empty image", "too many frames",
                                  "mixed sizes", "num_frames below the frames sent", "num_frames beyond the limit",
                                  "an image too large", "too many bytes together"])
def test_bad_frames_are_invalid_argument_and_the_encoder_keeps_serving(stub, videos_dir, orbit_pngs, portrait_pngs,
                                                                        case):
    fields, message = bad_encode_requests(orbit_pngs, portrait_pngs)[case]
    with pytest.raises(grpc.RpcError) as err:
        encode(stub, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert re.search(message, err.value.details()), err.value.details()
    header, tokens = encode(stub, frames=frames(orbit_pngs))
    assert tokens.shape == (576, 64) and header.num_frames == 4


# ---- the decoder ---------------------------------------------------------------------------------

def test_frames_caption_like_the_video_and_the_cache_keys_on_them(decoder, encoder, videos_dir, orbit_pngs):
    with Client(decoder.address, timeout=120) as client:
        video = client.caption_full(videos_dir / "orbit.mp4", max_new_tokens=24, request_id="video-1")
        first = client.caption_full(frames=orbit_pngs, max_new_tokens=24, request_id="frames-1")
        again = client.caption_full(frames=list(orbit_pngs), prompt="What moves?", max_new_tokens=8,
                                    request_id="frames-2")
        changed = client.caption_full(frames=orbit_pngs[:3] + [orbit_pngs[0]], max_new_tokens=8,
                                      request_id="frames-3")
    assert first.token_ids == video.token_ids and len(video.token_ids) == 24
    assert first.caption == video.caption
    assert (first.num_frames, first.num_visual_tokens) == (video.num_frames, video.num_visual_tokens) == (4, 576)
    assert not video.visual_tokens_cached and not first.visual_tokens_cached  # frames are not the video file
    assert again.visual_tokens_cached and not changed.visual_tokens_cached
    seen = encoded_ids(encoder)
    assert {"video-1", "frames-1", "frames-3"} <= seen and "frames-2" not in seen


def test_frame_paths_and_files_caption_like_bytes(decoder, frames_dir, orbit_pngs):
    from pllava_client import frame_files

    paths = frame_files(frames_dir)
    assert [p.read_bytes() for p in paths] == orbit_pngs
    with Client(decoder.address, timeout=120) as client:
        expected = client.caption_full(frames=orbit_pngs, max_new_tokens=12)
        by_path = client.caption_full(frames=paths, max_new_tokens=12)
        with open(paths[0], "rb") as f:
            mixed = client.caption_full(frames=[f, str(paths[1]), *orbit_pngs[2:]], max_new_tokens=12)
    assert by_path.token_ids == mixed.token_ids == expected.token_ids


@pytest.mark.parametrize("case, message", [
    ("empty list", r"^frames: no frames \(CaptionRequest.frames.images is empty\)"),
    ("bad image bytes", r"^frames: frame 1: not a JPEG, PNG or WebP image"),
    ("mixed sizes", r"^frames: frame 1 is 333x241 but frame 0 is 322x182"),
    ("num_frames below the frames sent", "num_frames is 3 but 4 frames were sent"),
    ("too many frames", "300 frames were sent but this encoder takes at most 256"),
])
def test_bad_frames_through_the_decoder_are_invalid_argument(decoder, videos_dir, orbit_pngs, case, message):
    request = pllava_pb2.CaptionRequest(sampling=pllava_pb2.SamplingParams(max_new_tokens=2))
    if case == "empty list":
        request.frames.CopyFrom(frames([]))
    elif case == "bad image bytes":
        request.frames.CopyFrom(frames([orbit_pngs[0], b"\x00garbage" * 100]))
    elif case == "mixed sizes":
        request.frames.CopyFrom(frames([orbit_pngs[0], (videos_dir / "still.jpg").read_bytes()]))
    elif case == "num_frames below the frames sent":
        request.frames.CopyFrom(frames(orbit_pngs))
        request.num_frames = 3
    elif case == "too many frames":
        request.frames.CopyFrom(frames([orbit_pngs[0]] * 300))
    with grpc.insecure_channel(decoder.address, options=channel_options()) as channel:
        stub = pllava_pb2_grpc.DecoderStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Caption(request, timeout=120))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert re.search(message, err.value.details()), err.value.details()
    with Client(decoder.address, timeout=120) as client:  # still serving
        assert len(client.caption_full(frames=orbit_pngs, max_new_tokens=2).token_ids) == 2


def test_client_refuses_both_or_neither_video_and_frames(decoder, videos_dir, orbit_pngs):
    with Client(decoder.address, timeout=60) as client:
        with pytest.raises(TypeError, match="either a video or frames=.*not both"):
            client.caption(videos_dir / "orbit.mp4", frames=orbit_pngs)
        with pytest.raises(TypeError, match="either a video or frames=.*got neither"):
            client.caption_full()
        with pytest.raises(ValueError, match="frames is empty"):
            client.caption(frames=[])


# ---- the command lines ---------------------------------------------------------------------------

def run(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, argv)], capture_output=True, text=True, timeout=timeout)


def test_pllava_caption_frames_dir(decoder, videos_dir, frames_dir):
    with Client(decoder.address, timeout=120) as client:
        expected = client.caption_full(videos_dir / "orbit.mp4", max_new_tokens=16)
    done = run(console_script("pllava-caption"), "--frames", frames_dir, "--server", decoder.address,
               "--max-new-tokens", 16, "--json", "--timeout", 120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["token_ids"] == expected.token_ids and got["num_frames"] == 4
    streamed = run(console_script("pllava-caption"), "--frames", frames_dir, "--server", decoder.address,
                   "--max-new-tokens", 16)
    assert streamed.returncode == 0 and streamed.stdout == expected.caption + "\n"


def test_pllava_caption_frames_errors(decoder, frames_dir, tmp_path, videos_dir):
    caption = console_script("pllava-caption")
    empty = tmp_path / "no-frames"
    empty.mkdir()
    (empty / "clip.mp4").write_bytes(b"not a frame")
    done = run(caption, "--frames", empty, "--server", decoder.address)
    assert done.returncode == 2 and "no frames in this folder" in done.stderr and str(empty) in done.stderr
    done = run(caption, "--frames", tmp_path / "missing", "--server", decoder.address)
    assert done.returncode == 2 and "not a folder of frames" in done.stderr
    done = run(caption, videos_dir / "orbit.mp4", "--frames", frames_dir, "--server", decoder.address)
    assert done.returncode == 2 and "takes no VIDEO" in done.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes((frames_dir / "frame_0008.png").read_bytes())
    (mixed / "b.jpg").write_bytes((videos_dir / "still.jpg").read_bytes())
    done = run(caption, "--frames", mixed, "--server", decoder.address, "--timeout", 120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: INVALID_ARGUMENT: mixed: frame 1 is 333x241 but frame 0 is 322x182")


def test_in_process_pllava_caption_frames(decoder, tiny_model_dir, frames_dir):
    """``pllava caption --frames DIR`` (one process) gives what the servers give."""
    with Client(decoder.address, timeout=120) as client:
        expected = client.caption_full(frames=sorted(frames_dir.glob("*.png")), max_new_tokens=12)
    done = run(console_script("pllava"), "caption", "--frames", frames_dir, "--model", tiny_model_dir,
               "--max-new-tokens", 12, "--max-context", CONTEXT, "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["token_ids"] == expected.token_ids and got["num_frames"] == 4
    assert got["num_visual_tokens"] == expected.num_visual_tokens == 576
    both = run(console_script("pllava"), "caption", "x.mp4", "--frames", frames_dir, "--model", tiny_model_dir)
    assert both.returncode == 2 and "one of them" in both.stderr


def test_caption_error_names_the_frame(decoder, orbit_pngs):
    with Client(decoder.address, timeout=60) as client:
        with pytest.raises(CaptionError) as refused:
            client.caption_full(frames=[orbit_pngs[0], b"%PDF-1.7 not an image"], video_name="shots")
    assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.message.startswith("shots: frame 1: not a JPEG, PNG or WebP image")
