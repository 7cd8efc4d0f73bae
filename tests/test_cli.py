"""The ``pllava`` command as a user runs it."""
from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from pllava.tokenizer import Tokenizer


def pllava(*args, check=True):
    run = subprocess.run([sys.executable, "-m", "pllava.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=300)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def caption_json(tiny_model_dir, videos_dir):
    run = pllava("caption", videos_dir / "orbit.mp4", "--model", tiny_model_dir, "--json", "--max-new-tokens", 24)
    return json.loads(run.stdout)


def test_make_tiny_is_deterministic(tmp_path):
    pllava("make-tiny", tmp_path / "a", "--seed", "3")
    pllava("make-tiny", tmp_path / "b", "--seed", "3")
    pllava("make-tiny", tmp_path / "c", "--seed", "4")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files and len(files) >= 9
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert not mismatch and not errors
    assert not filecmp.cmp(tmp_path / "a" / files[files.index("model-00001-of-00002.safetensors")],
                           tmp_path / "c" / "model-00001-of-00002.safetensors", shallow=False)


def test_caption_json(caption_json, tiny_model_dir):
    out = caption_json
    assert set(out) >= {"caption", "prompt", "prompt_token_ids", "token_ids", "num_visual_tokens",
                        "finish_reason", "timings"}
    assert out["num_visual_tokens"] == 576 and out["num_frames"] == 4
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 24
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    assert out["caption"] == tok.decode(out["token_ids"]) and out["caption"].strip()
    assert out["prompt_token_ids"] == tok.encode(out["prompt"])
    assert out["prompt"].endswith("USER:Describe the video in details. ASSISTANT:")
    for key in ("video_decode_ms", "encode_ms", "prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s"):
        assert out["timings"][key] > 0


def test_every_end_id_of_generation_config_stops_the_caption(caption_json, tiny_model_dir, videos_dir, tmp_path):
    """generation_config.json may list several end ids (transformers' generate stops on any):
    the one the greedy caption reaches first ends it with "stop" (only </s> did before)."""
    ids = caption_json["token_ids"]
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    model = tmp_path / "model"
    model.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.name != "generation_config.json":
            (model / file.name).symlink_to(file)
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, ids[k]]}))
    out = json.loads(pllava("caption", videos_dir / "orbit.mp4", "--model", model, "--json",
                            "--max-new-tokens", 24).stdout)
    assert out["token_ids"] == ids[:k + 1] and out["finish_reason"] == "stop"


def test_streaming_prints_the_same_caption(caption_json, tiny_model_dir, videos_dir):
    run = pllava("caption", videos_dir / "orbit.mp4", "--model", tiny_model_dir, "--max-new-tokens", 24)
    assert run.stdout == caption_json["caption"] + "\n"


def test_in_process_captioner_matches_cli(caption_json, tiny_model_dir, videos_dir):
    from pllava.pipeline import Captioner, CaptionResult
    from pllava.sampling import SamplingParams

    result = CaptionResult()
    pieces = list(Captioner(tiny_model_dir).caption(videos_dir / "orbit.mp4", params=SamplingParams(max_new_tokens=24),
                                                   result=result))
    assert result.token_ids == caption_json["token_ids"] and "".join(pieces) == caption_json["caption"]


def test_benchmark_reports_the_port_figure_and_the_split(tiny_model_dir, videos_dir):
    run = pllava("caption", videos_dir / "portrait.mp4", "--model", tiny_model_dir, "--benchmark", "--max-new-tokens", 16)
    for row in ("tokens/s, port method", "decode-only tokens/s", "time to first token", "frames / visual tokens",
                "prompt text tokens", "whole call, second run"):
        assert row in run.stdout, run.stdout
    assert "4 / 576" in run.stdout


def test_still_image_and_sampling_options(tiny_model_dir, tmp_path):
    image = tmp_path / "gray.png"
    Image.new("L", (300, 500), 90).save(image)
    args = ("caption", image, "--model", tiny_model_dir, "--json", "--max-new-tokens", 8, "--temperature", "0.9",
            "--top-p", "0.8", "--top-k", "20", "--seed", "5", "--repetition-penalty", "1.2")
    first, second = json.loads(pllava(*args).stdout), json.loads(pllava(*args).stdout)
    assert first["num_frames"] == 1 and first["num_visual_tokens"] == 576
    assert first["token_ids"] == second["token_ids"]  # seeded sampling is reproducible


def test_caption_from_converted_ckpt(tiny_model_dir, videos_dir, caption_json, tmp_path):
    model = tmp_path / "ckpt-model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            (model / f.name).write_bytes(f.read_bytes())
    pllava("convert", tiny_model_dir, "-o", model / "model.ckpt")
    out = json.loads(pllava("caption", videos_dir / "orbit.mp4", "--model", model, "--json",
                            "--max-new-tokens", 24).stdout)
    assert out["token_ids"] == caption_json["token_ids"]


@pytest.mark.parametrize("make_args, message", [
    (lambda m, v, t: ("caption", v, "--model", t / "nowhere"), "config.json does not exist"),
    (lambda m, v, t: ("caption", t / "notes.txt", "--model", m), "notes.txt"),
    (lambda m, v, t: ("caption", v, "--model", m, "--top-p", "0"), "top_p"),
    (lambda m, v, t: ("caption", v, "--model", m, "--temperature", "nan"), "temperature must be a finite number"),
    (lambda m, v, t: ("caption", v, "--model", m, "--repetition-penalty", "inf"),
     "repetition_penalty must be a finite number, got inf"),
    (lambda m, v, t: ("caption", v, "--model", m, "--max-context", "600"), "context holds 600"),
    (lambda m, v, t: ("caption", v, "--model", m, "--num-frames", "0"), "number of frames must be at least 1, got 0"),
])
def test_user_errors_are_one_clear_line(tiny_model_dir, videos_dir, tmp_path, make_args, message):
    (tmp_path / "notes.txt").write_text("not a video\n")
    run = pllava(*make_args(tiny_model_dir, videos_dir / "orbit.mp4", tmp_path), check=False)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1234567\n")


def damage(folder, case: str) -> str:
    """Damage a copy of a checkpoint folder as a clone without git-lfs or a cut download
    would; the file the error must name."""
    shards = sorted(folder.glob("*.safetensors"))
    victim = {"shard pointer": shards[-1], "shard cut short": shards[0], "tokenizer pointer": folder / "tokenizer.json",
              "index pointer": folder / "model.safetensors.index.json", "config pointer": folder / "config.json"}[case]
    if case == "shard cut short":
        victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
    else:
        victim.write_text(LFS_POINTER)
    return str(victim)


@pytest.mark.parametrize("case, hint", [("shard pointer", "git lfs pull"), ("shard cut short", "download it again"),
                                        ("tokenizer pointer", "git lfs pull"), ("index pointer", "git lfs pull"),
                                        ("config pointer", "git lfs pull")])
def test_a_damaged_checkpoint_file_is_named_in_one_line(tiny_model_dir, videos_dir, tmp_path, case, hint):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    victim = damage(model, case)
    run = pllava("caption", videos_dir / "orbit.mp4", "--model", model, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith(f"pllava: error: {victim}") or f" {victim} " in run.stderr, run.stderr
    assert hint in run.stderr


def test_frames_cropped_to_another_size_than_the_tower_takes_are_a_config_error(tiny_model_dir, videos_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    pre = json.loads((model / "preprocessor_config.json").read_text())
    pre["crop_size"] = {"height": 224, "width": 224}
    (model / "preprocessor_config.json").write_text(json.dumps(pre))
    run = pllava("caption", videos_dir / "orbit.mp4", "--model", model, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "frames are cropped to 224x224" in run.stderr and "vision tower takes 336x336" in run.stderr


def test_unavailable_device_is_a_clear_error(tiny_model_dir, videos_dir):
    run = pllava("caption", videos_dir / "orbit.mp4", "--model", tiny_model_dir, "--device", "Ascend", check=False)
    assert run.returncode == 2
    assert "cannot run on Ascend" in run.stderr and "Traceback" not in run.stderr
