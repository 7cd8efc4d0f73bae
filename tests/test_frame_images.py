"""Frames sent as images, without servers: decoding (pllava.frame_images), the frame count
rule, the decoder's cache key, and the client's folder reading (pllava_client.frames)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pllava.frame_images import decode_frame_image, frames_num_frames, load_frame_images
from pllava.video import VideoError, load_frames, preprocess
from pllava_client.frames import frame_files, read_frames
from pllava_decoder.visual_cache import visual_key


def encode_image(pixels: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def orbit_frames(videos_dir) -> np.ndarray:
    """The 4 frames pllava.video samples from orbit.mp4 (the tiny model's num_frames)."""
    return load_frames(videos_dir / "orbit.mp4", 4).frames


def test_lossless_frames_decode_to_the_video_frames_and_pixels(orbit_frames):
    pngs = [encode_image(f, "PNG") for f in orbit_frames]
    webps = [encode_image(f, "WEBP", lossless=True) for f in orbit_frames]
    for images in (pngs, webps):
        frames = load_frame_images(images, "clip")
        assert frames.frames.dtype == np.uint8 and frames.frames.shape == orbit_frames.shape
        np.testing.assert_array_equal(frames.frames, orbit_frames)
        assert frames.indices == (0, 1, 2, 3) and frames.total_frames == 4 and not frames.is_image
    np.testing.assert_array_equal(preprocess(load_frame_images(pngs).frames), preprocess(orbit_frames))


def test_jpeg_frames_decode_like_the_same_jpeg_as_a_still_image(videos_dir):
    still = (videos_dir / "still.jpg").read_bytes()
    frames = load_frame_images([still, still], "clip").frames
    expected = load_frames(videos_dir / "still.jpg", 4).frames[0]
    assert frames.shape == (2, *expected.shape)
    np.testing.assert_array_equal(frames[1], expected)


def test_exif_orientation_is_applied_as_for_a_still_image():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", exif=exif)
    frame = decode_frame_image(out.getvalue(), "frame 0")
    assert frame.shape == (40, 20, 3)  # upright, as a person sees it
    assert frame[:20].min() == 255 and frame[20:].max() == 0


@pytest.mark.parametrize("case, message", [
    ("empty list", r"^clip: no frames \(the list of images is empty\); send at least one image$"),
    ("empty image", r"^clip: frame 1: the image is empty \(0 bytes\)$"),
    ("random bytes", r"^clip: frame 1: not a JPEG, PNG or WebP image \(it starts with [0-9a-f ]+\)"),
    ("gif", r"^clip: frame 1: not a JPEG, PNG or WebP image \(it starts with 47 49 46 38"),  # GIF8
    ("truncated png", r"^clip: frame 1: could not be read as an image; it may be corrupt or truncated"),
    ("png magic then noise", r"^clip: frame 1: could not be read as an image"),
    ("mixed sizes", r"^clip: frame 2 is 322x100 but frame 0 is 322x182; all frames must have the same size"),
])
def test_bad_frames_raise_video_error_naming_the_frame(orbit_frames, case, message):
    good = encode_image(orbit_frames[0], "PNG")
    rng = np.random.default_rng(0)
    second = {
        "empty image": b"",
        "random bytes": rng.bytes(4096),
        "gif": encode_image(orbit_frames[1], "GIF"),
        "truncated png": good[: len(good) // 2],
        "png magic then noise": good[:8] + rng.bytes(4096),
        "mixed sizes": good,
    }.get(case)
    images = [] if case == "empty list" else [good, second]
    if case == "mixed sizes":
        images.append(encode_image(orbit_frames[2][:100], "JPEG"))
    with pytest.raises(VideoError, match=message):
        load_frame_images(images, "clip")


def test_frame_count_rule():
    # 0: the larger of the model's default and the frames sent
    assert frames_num_frames(0, 1, 4) == 4      # one frame: repeated like a still image
    assert frames_num_frames(0, 3, 4) == 4
    assert frames_num_frames(0, 4, 4) == 4
    assert frames_num_frames(0, 9, 4) == 9      # as a video sampled with num_frames=9
    # explicit: at least the frames sent
    assert frames_num_frames(9, 9, 4) == 9 and frames_num_frames(16, 9, 4) == 16
    with pytest.raises(ValueError, match="num_frames is 4 but 9 frames were sent; .* at least 9"):
        frames_num_frames(4, 9, 4)


def test_cache_key_covers_frames_and_tells_them_from_videos():
    a, b, c = b"\x89PNG first", b"\x89PNG second", b"\x89PNG third"
    key = visual_key([a, b], 4, "m")
    assert key == visual_key((a, b), 4, "m") == visual_key([bytearray(a), b], 4, "m")  # content only
    assert key.content_sha256.startswith("frames:")
    others = [visual_key([b, a], 4, "m"),        # order matters
              visual_key([a, b, c], 4, "m"),     # every frame counts
              visual_key([a + b[:3], b[3:]], 4, "m"),  # the same bytes split otherwise
              visual_key([a, b], 8, "m"), visual_key([a, b], 4, "other"),
              visual_key(a + b, 4, "m")]         # a video file with the frames' bytes
    assert len({key, *others}) == len(others) + 1


def test_frame_files_lists_the_images_in_name_order(tmp_path):
    for name in ("f_0010.png", "f_0002.JPG", "f_0001.webp", "f_0003.jpeg"):
        (tmp_path / name).write_bytes(b"image")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub.png").mkdir()  # a folder, not a frame
    assert [p.name for p in frame_files(tmp_path)] == ["f_0001.webp", "f_0002.JPG", "f_0003.jpeg", "f_0010.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "clip.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="no frames in this folder"):
        frame_files(empty)
    with pytest.raises(ValueError, match="not a folder of frames"):
        frame_files(tmp_path / "f_0010.png")


def test_read_frames_accepts_paths_bytes_and_files(tmp_path):
    folder = tmp_path / "clip07"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"AAA")
    with open(folder / "a.png", "rb") as f:
        images, name = read_frames([folder / "a.png", str(folder / "a.png"), b"BB", bytearray(b"C"), f])
    assert images == [b"AAA", b"AAA", b"BB", b"C", b"AAA"] and name == "clip07"
    assert read_frames(iter([b"x"])) == ([b"x"], "")
    with pytest.raises(ValueError, match="frames is empty"):
        read_frames([])
    for wrong in (str(folder), folder, b"one image"):
        with pytest.raises(TypeError, match="frames is a list of images"):
            read_frames(wrong)
    with pytest.raises(TypeError, match="frame 1: a frame is a path, bytes or a binary file"):
        read_frames([b"x", 3])
