"""Frame sampling, loading and preprocessing (pllava/video.py) on the sample clips and images.

Preprocessing is checked against transformers' PIL-backend CLIP image processor, fed the
same frames after a PLLaVA long/short resize built from transformers' own helpers, the way
PLLaVA's processor calls them.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_transforms import resize as hf_resize
from transformers.image_utils import ChannelDimension, PILImageResampling

import odd_media
import pllava.video
from pllava.config import PreprocessorConfig
from pllava.video import (
    MAX_ASPECT_RATIO,
    Frames,
    VideoError,
    center_crop_box,
    clip_resize_size,
    get_index,
    load_frames,
    load_pixels,
    load_video,
    pixel_table,
    pllava_kept_size,
    pllava_resize_size,
    preprocess,
)

SAMPLES = Path(__file__).resolve().parents[1] / "samples"   # scripts/make_sample_media.py
ORBIT = SAMPLES / "orbit.mp4"          # 322x182, 25 fps, 160 frames
PORTRAIT = SAMPLES / "portrait.mp4"    # 190x338, 30 fps, 300 frames
SHORT = SAMPLES / "short.mp4"          # 250x142, 12 fps, 12 frames
STILL = SAMPLES / "still.jpg"          # 333x241


@pytest.fixture(scope="module")
def orbit() -> Frames:
    return load_frames(ORBIT, 16)


@pytest.fixture(scope="module")
def portrait() -> Frames:
    return load_frames(PORTRAIT, 16)


# --------------------------------------------------------------------------- get_index

@pytest.mark.parametrize("n, t, expected", [
    (300, 16, [9, 28, 46, 65, 84, 102, 121, 140, 159, 177, 196, 215, 233, 252, 271, 289]),
    (300, 4, [37, 112, 187, 261]),
    (10, 16, [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8, 8]),
    (1, 3, [0, 0, 0]),
    (160, 1, [79]),
])
def test_get_index_spec_values(n, t, expected):
    assert get_index(n, t) == expected


def test_get_index_rounds_half_to_even():
    # Spec 3.1: seg = 299/16 = 18.6875 and seg*8 = 149.5 -> np.round gives 150.
    assert (300 - 1) / 16 * 8 == 149.5
    assert get_index(300, 16)[8] == 9 + 150
    # Halves whose floor is even go DOWN, where int(x + 0.5) would go up.
    assert get_index(3, 4) == [0, 0, 1, 2]             # seg*1 = 0.5 -> 0
    assert get_index(301, 8)[3] == 18 + 112            # seg*3 = 112.5 -> 112, not 113


@pytest.mark.parametrize("n, t", [(0, 4), (10, 0), (-1, 4)])
def test_get_index_rejects_empty(n, t):
    with pytest.raises(ValueError):
        get_index(n, t)


# --------------------------------------------------------------------------- loading videos

def test_load_orbit(orbit):
    assert orbit.frames.shape == (16, 182, 322, 3) and orbit.frames.dtype == np.uint8
    assert orbit.indices == tuple(get_index(160, 16))
    assert orbit.indices[:3] == (4, 14, 24)
    assert (orbit.total_frames, orbit.fps, orbit.is_image) == (160, 25.0, False)


def test_load_portrait(portrait):
    assert portrait.frames.shape == (16, 338, 190, 3) and portrait.frames.dtype == np.uint8
    assert portrait.indices == (9, 28, 46, 65, 84, 102, 121, 140, 159, 177, 196, 215, 233, 252, 271, 289)
    assert (portrait.total_frames, portrait.fps, portrait.is_image) == (300, 30.0, False)
    for a, b in zip(portrait.frames[:-1], portrait.frames[1:]):   # really different frames
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_sample_frames_have_colour_and_texture(orbit, portrait):
    for frames in (orbit.frames, portrait.frames):
        channels = frames.reshape(-1, 3).astype(float)
        assert (channels.std(axis=0) > 30).all()                        # every channel varies
        assert np.abs(channels[:, 0] - channels[:, 2]).mean() > 20       # not grey
        rows = np.abs(np.diff(frames.astype(int), axis=2)).mean()
        assert rows > 3.5                                               # not flat: texture and edges (a bare gradient: ~1.5)


def test_frames_equal_reference_one_by_one_decode(portrait):
    # The reference decodes with vr[i].asnumpy(), one frame at a time.
    import decord
    reader = decord.VideoReader(str(PORTRAIT), ctx=decord.cpu(0))
    for k in (0, 7, 15):
        np.testing.assert_array_equal(portrait.frames[k], reader[portrait.indices[k]].asnumpy())


def test_path_bytes_and_file_object_give_identical_frames(portrait):
    data = PORTRAIT.read_bytes()
    with open(PORTRAIT, "rb") as handle:
        from_handle = load_frames(handle, 16)
    for loaded in (load_frames(str(PORTRAIT), 16), load_frames(data, 16), load_frames(bytearray(data), 16),
                   load_frames(io.BytesIO(data), 16), from_handle):
        np.testing.assert_array_equal(loaded.frames, portrait.frames)
        assert (loaded.indices, loaded.total_frames, loaded.fps, loaded.is_image) == \
            (portrait.indices, portrait.total_frames, portrait.fps, portrait.is_image)


def test_short_clip_repeats_its_frames():
    loaded = load_frames(SHORT, 16)   # 12 frames in the file
    assert loaded.frames.shape == (16, 142, 250, 3)
    assert (loaded.total_frames, loaded.fps, loaded.is_image) == (12, 12.0, False)
    # seg = 11/16: start 0, round(seg * i); seg * 8 = 5.5 rounds to even (6)
    assert loaded.indices == (0, 1, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 8, 9, 10, 10)
    for k in range(15):
        same = np.array_equal(loaded.frames[k], loaded.frames[k + 1])
        assert same == (loaded.indices[k] == loaded.indices[k + 1])


def test_video_shorter_than_num_frames_repeats_frames():
    loaded = load_frames(ORBIT, 400)   # 160 frames in the file
    assert loaded.frames.shape == (400, 182, 322, 3)
    assert loaded.indices == tuple(get_index(160, 400))
    assert sorted(set(loaded.indices)) == list(range(160))
    repeats = [k for k in range(399) if loaded.indices[k] == loaded.indices[k + 1]]
    assert len(repeats) == 240
    for k in repeats[:5]:
        np.testing.assert_array_equal(loaded.frames[k], loaded.frames[k + 1])


def test_single_frame():
    loaded = load_frames(ORBIT, 1)
    assert loaded.indices == (79,) and loaded.frames.shape == (1, 182, 322, 3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_frames_must_be_positive_int(bad):
    with pytest.raises(VideoError, match="num_frames"):
        load_frames(ORBIT, bad)


# --------------------------------------------------------------------------- loading images

def test_sample_still_is_one_frame_as_pil_reads_it():
    loaded = load_frames(STILL, 16)
    assert loaded.is_image and loaded.frames.shape == (1, 241, 333, 3)
    assert (loaded.indices, loaded.total_frames, loaded.fps) == ((0,), 1, 0.0)
    np.testing.assert_array_equal(loaded.frames[0], np.asarray(Image.open(STILL).convert("RGB")))
    pixels, frames = load_video(STILL, 16)
    assert pixels.shape == (1, 3, 336, 336) and frames.is_image


def _rng_image(h, w, channels=3, seed=0):
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_png_is_one_frame_with_exact_pixels(tmp_path):
    pixels = _rng_image(37, 53)   # odd sizes
    path = tmp_path / "odd.png"
    Image.fromarray(pixels).save(path)
    for source in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        loaded = load_frames(source, 16)   # not repeated to 16: the model does that
        assert loaded.is_image and loaded.frames.shape == (1, 37, 53, 3)
        assert (loaded.indices, loaded.total_frames, loaded.fps) == ((0,), 1, 0.0)
        np.testing.assert_array_equal(loaded.frames[0], pixels)


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.fromarray(_rng_image(48, 64, channels=1)).save(path, quality=90)
    loaded = load_frames(path, 8)
    assert loaded.is_image and loaded.frames.shape == (1, 48, 64, 3)
    gray = np.asarray(Image.open(path))
    for c in range(3):
        np.testing.assert_array_equal(loaded.frames[0, ..., c], gray)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[:5] = (10, 200, 30, 255)   # opaque top half; bottom half fully transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    frame = load_frames(path, 4).frames[0]
    assert (frame[:5] == (10, 200, 30)).all() and (frame[5:] == 255).all()


def test_palette_and_16bit_images(tmp_path):
    rgb = _rng_image(20, 30)
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_frames(tmp_path / "p.png", 4).frames[0], np.asarray(palette.convert("RGB")))
    deep = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    frame = load_frames(tmp_path / "deep.png", 4).frames[0]
    np.testing.assert_array_equal(frame[..., 0], (deep >> 8).astype(np.uint8))   # not clipped at 255


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(_rng_image(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90 CW to display"
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert load_frames(tmp_path / "phone.jpg", 4).frames.shape == (1, 40, 20, 3)


def test_load_video_on_image_gives_one_frame(tmp_path):
    Image.fromarray(_rng_image(240, 320)).save(tmp_path / "a.png")
    pixels, frames = load_video(tmp_path / "a.png", 16)
    assert pixels.shape == (1, 3, 336, 336) and frames.is_image


# --------------------------------------------------------------------------- errors

def _box(kind: bytes, payload: bytes) -> bytes:
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


def test_empty_input(tmp_path):
    with pytest.raises(VideoError, match=r"<bytes>.*empty"):
        load_frames(b"", 4)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4.*empty"):
        load_frames(tmp_path / "empty.mp4", 4)


@pytest.mark.parametrize("container, codec", [("matroska", "libx264"), ("webm", "libvpx")])
def test_truncated_matroska_and_webm(tmp_path, container, codec):
    """A cut-off MKV/WebM still decodes what is left (decord samples every frame from its first
    third); the segment size its header announces tells it is cut short."""
    data = odd_media.moving_video(container, codec)
    assert load_frames(data, 4).total_frames == 48  # whole: loads
    with pytest.raises(VideoError, match=r"^<bytes>: the file is truncated: its Matroska segment needs \d+ bytes but "
                                         rf"the file ends after {len(data) * 3 // 10} bytes"):
        load_frames(data[: len(data) * 3 // 10], 4)
    path = tmp_path / "cut.mkv"
    path.write_bytes(data[:-1])
    with pytest.raises(VideoError, match=r"^.*cut\.mkv: the file is truncated"):
        load_frames(path, 4)


def test_random_bytes():
    with pytest.raises(VideoError, match="not a recognised video or image"):
        load_frames(np.random.default_rng(0).bytes(100_000), 4)


def test_truncated_mp4(tmp_path):
    data = ORBIT.read_bytes()
    with pytest.raises(VideoError, match=r"<bytes>.*truncated"):
        load_frames(data[: len(data) // 2], 4)
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"half\.mp4.*truncated"):
        load_frames(path, 4)
    with pytest.raises(VideoError, match="no 'moov' box"):
        load_frames(data[:40], 4)   # ftyp + free only


def test_corrupt_mp4_that_decord_rejects():
    # Well-formed boxes, nonsense inside: passes the cheap checks, so decord itself must fail.
    rng = np.random.default_rng(1)
    data = ORBIT.read_bytes()[:32] + _box(b"moov", rng.bytes(2000)) + _box(b"mdat", rng.bytes(3000))
    with pytest.raises(VideoError, match="could not be decoded as a video"):
        load_frames(data, 4)
    with pytest.raises(VideoError, match="could not be decoded as a video"):
        load_frames(b"\x1a\x45\xdf\xa3" + rng.bytes(5000), 4)   # Matroska magic, random body


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match=r"notes\.txt.*text file"):
        load_frames(path, 4)
    with open(path) as text_mode:
        with pytest.raises(VideoError, match="text mode"):
            load_frames(text_mode, 4)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(VideoError, match=r"nope\.mp4: no such file"):
        load_frames(tmp_path / "nope.mp4", 4)
    with pytest.raises(VideoError, match="not a regular file"):
        load_frames(tmp_path, 4)


def test_a_corrupt_tiff_that_makes_pillow_raise_type_error_is_a_video_error():
    """Pillow raises TypeError ('IFDRational' ...) on this TIFF; any decoder failure of an
    image is the input's fault (VideoError -> INVALID_ARGUMENT), not an internal error."""
    with pytest.raises(VideoError, match=r"^<bytes>: could not be read as an image; it may be corrupt or truncated "
                                         r"\(TypeError: 'IFDRational' object cannot be interpreted as an integer\)"):
        load_frames(odd_media.tiff_with_rational_strip_offsets(), 4)


def test_truncated_image(tmp_path):
    Image.fromarray(_rng_image(64, 64)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    with pytest.raises(VideoError, match="could not be read as an image"):
        load_frames(data[: len(data) // 2], 4)


def test_wrong_source_type():
    with pytest.raises(TypeError):
        load_frames(12345, 4)


def test_process_survives_bad_inputs_then_decodes():
    data = ORBIT.read_bytes()
    rng = np.random.default_rng(2)
    bad = [data[: len(data) // 3], rng.bytes(4096), data[:32] + _box(b"moov", rng.bytes(500))]
    for _ in range(3):
        for source in bad:
            with pytest.raises(VideoError):
                load_frames(source, 4)
    assert load_frames(data, 2).frames.shape == (2, 182, 322, 3)


@pytest.mark.parametrize("container", ["mp4", "matroska"])
def test_a_file_without_a_video_stream_says_so(container):
    with pytest.raises(VideoError, match=r"^<bytes>: the file has no video stream \(it holds only audio\)"):
        load_frames(odd_media.audio_only(container), 4)


def test_a_file_without_any_stream_says_so():
    with pytest.raises(VideoError, match=r"it has no streams at all \(no video, no audio\)"):
        load_frames(odd_media.no_streams_mp4(), 4)


@pytest.mark.parametrize("width, height", [(1, 1), (2, 2), (16, 16), (48, 64)])
def test_a_video_too_narrow_to_decode_is_refused_as_too_small(width, height):
    """decord garbles frames this narrow (and PLLaVA's reference with it); they are refused
    by name instead of "corrupt or truncated"."""
    with pytest.raises(VideoError, match=rf"the video is only {width}x{height} pixels, too small"):
        load_frames(odd_media.tiny_video(width, height), 4)


@pytest.mark.parametrize("width, height", [(18, 18), (64, 64), (130, 2)])
def test_small_videos_the_decoder_handles_are_loaded(width, height):
    frames = load_frames(odd_media.tiny_video(width, height), 4)
    assert frames.frames.shape == (4, height, width, 3) and not frames.is_image
    if width <= MAX_ASPECT_RATIO * height:  # 130x2 is decoded, but refused by the preprocessing (65:1)
        assert load_video(odd_media.tiny_video(width, height), 4)[0].shape == (4, 3, 336, 336)


def _png(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rng_image(height, width)).save(buf, "PNG")
    return buf.getvalue()


def test_frames_of_an_extreme_aspect_ratio_are_refused(monkeypatch):
    """PLLaVA's resize keeps the short side at 336 pixels, so a 2048x1 strip (within any pixel
    limit) would become 688128x336 pixels a frame. Over 10:1 is refused by name, from the
    header for a video (before decoding), whichever way the frames arrive."""
    assert MAX_ASPECT_RATIO == 10
    limit = r"over the limit of 10:1 \(the preprocessing keeps the short side at 336 pixels: "
    with pytest.raises(VideoError, match=rf"^strip\.png: the image is 2048x1 pixels, an aspect ratio of 2048:1, "
                                         rf"{limit}688128x336 after resizing\); crop or pad to at most 10:1 first$"):
        load_pixels(_named(_png(1, 2048), "strip.png"), 4)
    spy = _GroupSpy(monkeypatch)
    with pytest.raises(VideoError, match=rf"^thin\.mp4: the video's frames are 130x2 pixels, an aspect ratio of "
                                         rf"65:1, {limit}21840x336 after resizing\)"):
        load_pixels(_named(odd_media.tiny_video(130, 2), "thin.mp4"), 4)
    assert spy.batches == []  # refused from the header: no frame was decoded
    # preprocess itself refuses them (the in-process pipeline, frames sent as images), tall ones too
    with pytest.raises(VideoError, match=rf"^the frames are 2x41 pixels, an aspect ratio of 20.5:1, {limit}"
                                         r"336x6888 after resizing\)"):
        preprocess(np.zeros((3, 41, 2, 3), np.uint8))
    with pytest.raises(VideoError, match=r"^the frames are 130x2 pixels"):
        load_video(odd_media.tiny_video(130, 2), 4)
    # 10:1 exactly passes, and is preprocessed as before; just over it is refused
    for height, width in [(4, 40), (40, 4), (34, 336)]:
        frames = _rng_image(height, width)[None]
        _assert_parity(frames, PreprocessorConfig(), (1, 3, 336, 336))
        np.testing.assert_array_equal(load_pixels(_png(height, width), 4), preprocess(frames))
    for height, width in [(4, 41), (41, 4), (33, 336)]:
        with pytest.raises(VideoError, match="over the limit of 10:1"):
            preprocess(_rng_image(height, width)[None])
        with pytest.raises(VideoError, match="the image is .* over the limit of 10:1"):
            load_pixels(_png(height, width), 4)


def _named(data: bytes, name: str) -> io.BytesIO:
    source = io.BytesIO(data)
    source.name = name
    return source


def test_a_one_pixel_image_is_loaded():
    buf = io.BytesIO()
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(buf, "PNG")
    assert load_video(buf.getvalue(), 4)[0].shape == (1, 3, 336, 336)


def test_frames_over_max_frame_pixels_are_refused_from_the_header():
    """Decompression bombs: a few KB declaring 10000x10000 frames are refused before decoding."""
    bomb = odd_media.mkv_declaring(10_000, 10_000)
    assert len(bomb) < 10_000
    with pytest.raises(VideoError, match=r"the video's frames are 10000x10000 = 100,000,000 pixels, over the limit "
                                         r"of 16,777,216 pixels per frame \(max_frame_pixels\)"):
        load_frames(bomb, 4, max_frame_pixels=4096 * 4096)
    png = odd_media.png_declaring(5000, 5000)
    with pytest.raises(VideoError, match=r"the image is 5000x5000 = 25,000,000 pixels, over the limit"):
        load_frames(png, 4, max_frame_pixels=4096 * 4096)
    with pytest.raises(VideoError, match="refused as a possible decompression bomb"):  # Pillow's own limit
        load_frames(odd_media.png_declaring(30_000, 30_000), 4)
    # The limit is per frame: orbit.mp4 (322x182 = 58,604 pixels) passes at exactly its size.
    assert load_frames(ORBIT, 2, max_frame_pixels=322 * 182).frames.shape == (2, 182, 322, 3)
    with pytest.raises(VideoError, match=r"orbit\.mp4: the video's frames are 322x182 = 58,604 pixels"):
        load_frames(ORBIT, 2, max_frame_pixels=322 * 182 - 1)
    with pytest.raises(VideoError, match=r"still\.jpg: the image is 333x241"):
        load_frames(STILL, 2, max_frame_pixels=333 * 241 - 1)


# --------------------------------------------------------------------------- decoding in groups

class _GroupSpy:
    """Wraps decord.VideoReader: records each get_batch's frame count and whether any frames an
    earlier get_batch returned were still alive (referenced) when it was called."""

    def __init__(self, monkeypatch):
        import weakref

        import decord
        self.batches: list[int] = []
        self.alive_at_call: list[int] = []
        spy = self
        real = decord.VideoReader

        class Batch:
            def __init__(self, array):
                self.array = array

            def asnumpy(self):
                frames = self.array.asnumpy()
                spy.returned.append(weakref.ref(frames))
                return frames

        class Reader(real):
            def get_batch(self, indices):
                spy.alive_at_call.append(sum(ref() is not None for ref in spy.returned))
                spy.batches.append(len(indices))
                return Batch(super().get_batch(indices))

        self.returned: list = []
        monkeypatch.setattr(decord, "VideoReader", Reader)


def _all_at_once(source, num_frames: int) -> np.ndarray:
    """The frames as decord gives them in ONE get_batch (how videos were read before)."""
    import decord
    reader = decord.VideoReader(str(source) if isinstance(source, Path) else io.BytesIO(source), ctx=decord.cpu(0))
    return reader.get_batch(get_index(len(reader), num_frames)).asnumpy()


def test_a_video_is_decoded_a_group_at_a_time_with_the_same_pixels(monkeypatch):
    """load_pixels (what a video worker runs) holds one group of full-size frames at a time:
    1080p frames are 6.2 MB, so 24 of them come 10 at a time (64 MiB), each group released
    before the next is decoded; the pixels are those of the old all-at-once decode, bit for bit."""
    data = odd_media.tiny_video(1920, 1080, frames=12)
    expected = preprocess(_all_at_once(data, 24))
    spy = _GroupSpy(monkeypatch)
    pixels = load_pixels(data, 24)
    assert spy.batches == [10, 10, 4] and spy.alive_at_call == [0, 0, 0]
    assert pixels.shape == (24, 3, 336, 336)
    np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize("clip, num_frames", [(ORBIT, 16), (PORTRAIT, 16), (SHORT, 16), (ORBIT, 40)])
def test_groups_of_frames_give_the_pixels_of_one_batch(monkeypatch, clip, num_frames):
    """Groups of 3 frames (a budget of 3 frames' bytes) on the sample clips: the same frames and
    pixels as one get_batch of all of them (short.mp4 repeats frames)."""
    frames = _all_at_once(clip, num_frames)
    height, width = frames.shape[1:3]
    monkeypatch.setattr(pllava.video, "DECODE_GROUP_BYTES", 3 * height * width * 3)
    spy = _GroupSpy(monkeypatch)
    loaded = load_frames(clip, num_frames)
    np.testing.assert_array_equal(loaded.frames, frames)
    pixels = load_pixels(clip.read_bytes(), num_frames)
    np.testing.assert_array_equal(pixels, preprocess(frames))
    assert spy.batches == ([3] * (num_frames // 3) + ([num_frames % 3] if num_frames % 3 else [])) * 2
    assert set(spy.alive_at_call) == {0}  # each group was released before the next was decoded


# --------------------------------------------------------------------------- preprocessing sizes

@pytest.mark.parametrize("size, after_pllava, after_clip, crop", [
    ((720, 1280), (360, 640), (336, 597), (0, 130)),
    ((1280, 720), (640, 360), (597, 336), (130, 0)),
    ((480, 640), (480, 640), (336, 448), (0, 56)),
    ((672, 1194), (360, 639), (336, 596), (0, 130)),
    ((240, 320), (336, 448), (336, 448), (0, 56)),
    ((360, 640), (360, 640), (336, 597), (0, 130)),
    ((320, 568), (336, 596), (336, 596), (0, 130)),
    ((182, 322), (336, 594), (336, 594), (0, 129)),   # orbit.mp4
    ((338, 190), (597, 336), (597, 336), (130, 0)),   # portrait.mp4
    ((241, 333), (336, 464), (336, 464), (0, 64)),    # still.jpg
])
def test_spec_size_table(size, after_pllava, after_clip, crop):
    assert pllava_resize_size(*size, 336) == after_pllava == pllava_kept_size(*size, 336)  # (nothing cut)
    assert clip_resize_size(*after_pllava, 336) == after_clip
    assert center_crop_box(*after_clip, 336, 336) == crop


def test_clip_constants():
    cfg = PreprocessorConfig()
    assert cfg.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert cfg.image_std == (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- preprocessing parity

def _reference_pllava_resize(frame: np.ndarray, shortest_edge: int) -> np.ndarray:
    """PLLaVA's long/short resize of one frame of a one-video batch, via transformers' helpers,
    then its crop of the long side to int(short * rate) pixels from overhead // 2 // 2."""
    h, w = frame.shape[:2]
    rate = max(h, w) / min(h, w)
    short = max(min(min(h, w), int(min(640, max(h, w)) / rate)), shortest_edge)
    size = get_resize_output_image_size(frame, size=short, default_to_square=False, max_size=9999,
                                        input_data_format=ChannelDimension.LAST)
    if min(size) < shortest_edge:
        size = get_resize_output_image_size(frame, size=short, default_to_square=False,
                                            input_data_format=ChannelDimension.LAST)
    resized = hf_resize(frame, size, resample=PILImageResampling.BICUBIC, input_data_format=ChannelDimension.LAST)
    keep = int(short * rate)
    start = (max(resized.shape[:2]) - keep) // 2 // 2
    return resized[start:start + keep] if h > w else resized[:, start:start + keep]


def _reference(frames: np.ndarray, cfg: PreprocessorConfig) -> np.ndarray:
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.shortest_edge},
        crop_size={"height": cfg.crop_size[0], "width": cfg.crop_size[1]},
        do_resize=cfg.do_resize, do_center_crop=cfg.do_center_crop, do_rescale=cfg.do_rescale,
        rescale_factor=cfg.rescale_factor, do_normalize=cfg.do_normalize,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        do_convert_rgb=cfg.do_convert_rgb, resample=cfg.resample)
    resized = [_reference_pllava_resize(f, cfg.shortest_edge) for f in frames]
    return np.asarray(processor(resized, return_tensors="np")["pixel_values"])


def _assert_parity(frames: np.ndarray, cfg: PreprocessorConfig, shape: tuple[int, ...]):
    ours = preprocess(frames, cfg)
    ref = _reference(frames, cfg)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == shape
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("rescale, normalize", [(True, True), (True, False), (False, True), (False, False)])
def test_the_pixel_table_is_transformers_rescale_and_normalize_bit_for_bit(rescale, normalize):
    """preprocess looks each uint8 up in a (3, 256) table: the table holds what transformers'
    arithmetic gives (rescale in float64 then float32, normalize in float32), exactly."""
    cfg = PreprocessorConfig(do_rescale=rescale, do_normalize=normalize)
    values = np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, axis=2)  # (1, 256, 3)
    pixels = values.astype(np.float32)
    if rescale:
        pixels = (values.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if normalize:
        pixels = (pixels - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    table = pixel_table(cfg)
    assert table.dtype == np.float32 and table.shape == (3, 256)
    np.testing.assert_array_equal(table, pixels[0].T)


def test_parity_orbit(orbit):
    _assert_parity(orbit.frames, PreprocessorConfig(), (16, 3, 336, 336))


def test_parity_portrait_upscales_short_side(portrait):
    _assert_parity(portrait.frames[:4], PreprocessorConfig(), (4, 3, 336, 336))


def test_parity_still():
    _assert_parity(load_frames(STILL, 1).frames, PreprocessorConfig(), (1, 3, 336, 336))


def _pil_resize(frames, height, width):
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


@pytest.mark.parametrize("name", ["portrait", "hd", "sd", "small", "odd", "big_odd", "square", "kept_wide",
                                  "kept_tall", "kept_big"])
def test_parity_other_shapes(orbit, name):
    frames = orbit.frames[::5]   # 4 decoded frames, 182x322
    frames = {
        "portrait": np.ascontiguousarray(frames.transpose(0, 2, 1, 3)),   # 322x182
        "hd": _pil_resize(frames, 720, 1280),                             # both resizes shrink
        "sd": _pil_resize(frames, 360, 640),                              # only the CLIP resize shrinks
        "small": _pil_resize(frames, 240, 320),
        "odd": np.ascontiguousarray(frames[:, 3:170, 5:318]),             # 167x313
        "big_odd": _pil_resize(frames, 451, 803),
        "square": np.ascontiguousarray(frames[:, :, 70:252]),             # 182x182
        # sizes where the reference's crop keeps one pixel fewer of the long side than its resize gives
        "kept_wide": _pil_resize(frames, 126, 153),                       # 336x408, kept 336x407
        "kept_tall": _pil_resize(frames, 153, 126),
        "kept_big": _pil_resize(frames, 168, 408),                        # 336x816, kept 336x815
    }[name]
    _assert_parity(frames, PreprocessorConfig(), (4, 3, 336, 336))


@pytest.mark.parametrize("changes, shape", [
    (dict(do_center_crop=False), (4, 3, 336, 594)),
    (dict(do_normalize=False), (4, 3, 336, 336)),
    (dict(do_rescale=False, do_normalize=False), (4, 3, 336, 336)),
    (dict(do_rescale=False), (4, 3, 336, 336)),
    (dict(do_resize=False), (4, 3, 336, 336)),
    (dict(shortest_edge=224, crop_size=(224, 224)), (4, 3, 224, 224)),
    (dict(shortest_edge=224, crop_size=(256, 300)), (4, 3, 256, 300)),   # crop larger than image: zero pad
    (dict(resample=2), (4, 3, 336, 336)),                                 # bilinear CLIP resize
])
def test_parity_config_flags(orbit, changes, shape):
    _assert_parity(orbit.frames[::5], PreprocessorConfig(**changes), shape)


def test_flag_semantics(orbit):
    frames = orbit.frames[:2]
    raw = preprocess(frames, PreprocessorConfig(do_rescale=False, do_normalize=False))
    assert raw.min() >= 0 and raw.max() <= 255 and np.array_equal(raw, np.round(raw))
    unit = preprocess(frames, PreprocessorConfig(do_normalize=False))
    np.testing.assert_allclose(unit, raw / 255, atol=1e-6)
    full = preprocess(frames)
    mean = np.array(PreprocessorConfig().image_mean, dtype=np.float32)[:, None, None]
    std = np.array(PreprocessorConfig().image_std, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(full, (unit - mean) / std, atol=1e-6)


def test_grayscale_image_end_to_end(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.fromarray(_rng_image(300, 401, channels=1)).save(path)
    pixels, frames = load_video(path, 16)
    assert pixels.shape == (1, 3, 336, 336)
    ref = _reference(np.asarray(Image.open(path).convert("RGB"))[None], PreprocessorConfig())
    assert np.abs(pixels - ref).max() <= 1e-5


def test_load_video_orbit():
    pixels, frames = load_video(ORBIT, 4)
    assert pixels.shape == (4, 3, 336, 336) and pixels.dtype == np.float32
    assert frames.indices == tuple(get_index(160, 4))


def test_preprocess_rejects_bad_arrays():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        preprocess(np.zeros((8, 8, 3), dtype=np.uint8))


def test_video_module_stays_framework_free():
    import subprocess
    import sys
    code = ("import sys, pllava.video; "
            "bad = [m for m in ('torch', 'mindspore', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
