"""Checkpoint layouts, LoRA merge, dtypes, partial loads and strict errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from pllava import cpu_kernels
from pllava import weights as W
from pllava.config import PllavaConfig
from pllava.layers import checkpoint_tensors
from pllava.model import PllavaLanguage, PllavaVision
from pllava import tiny
from pllava.tiny import save_sharded
from other_user import AS_ROOT, as_another_user, open_folder

RANK = 8


def read_all(model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in W.checkpoint_files(model_dir):
        out.update(load_file(str(path)))
    return out


def copy_meta(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst


def new_layout(name: str) -> str:
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("image_newline", "model.image_newline")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def peft_layout(tensors: dict[str, np.ndarray], lora_scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    """ermu2001/pllava-7b's save: PEFT-wrapped LM with LoRA (rank RANK) on q_proj and v_proj."""
    return tiny.peft_layout(tensors, RANK, lora_scale, seed)


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return PllavaConfig.from_pretrained(tiny_model_dir)


def loaded(model_dir, cfg, **kw) -> dict[str, np.ndarray]:
    vision = PllavaVision.from_pretrained(model_dir, cfg, **kw)
    language = PllavaLanguage.from_pretrained(model_dir, cfg, max_len=64, jit=False, **kw)
    out = checkpoint_tensors(vision)  # (packed half-precision projections unpacked)
    # fused and (in, out) weights back under the checkpoint's names and layout
    tensors = checkpoint_tensors(language.lm, skip=lambda n: n.endswith("_cache"))
    out.update({"language_model." + n: v for n, v in tensors.items()})
    return out


def test_three_layouts_load_identically(tiny_model_dir, cfg, tmp_path):
    tensors = read_all(tiny_model_dir)
    new_dir = copy_meta(tiny_model_dir, tmp_path / "new")
    save_sharded({new_layout(k): v for k, v in tensors.items()}, new_dir, num_shards=3)
    peft_dir = copy_meta(tiny_model_dir, tmp_path / "peft")
    save_sharded(peft_layout(tensors, lora_scale=0.0), peft_dir, num_shards=2)  # B = 0: no delta

    base = loaded(tiny_model_dir, cfg)
    assert set(base) and all(np.isfinite(v).all() for v in base.values())
    for other in (loaded(new_dir, cfg), loaded(peft_dir, cfg)):
        assert set(other) == set(base)
        for name in base:
            np.testing.assert_array_equal(other[name], base[name], err_msg=name)
    # and the values are the checkpoint's, not zeros left by a skipped key
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(base[q], tensors[q].astype(np.float32))


@pytest.mark.parametrize("alpha", [4.0, 32.0])
def test_lora_merge_matches_explicit_merge(tiny_model_dir, cfg, tmp_path, alpha):
    tensors = read_all(tiny_model_dir)
    peft = peft_layout({k: v.astype(np.float32) for k, v in tensors.items()}, lora_scale=0.5, seed=3)
    peft_dir = copy_meta(tiny_model_dir, tmp_path / "peft")
    save_sharded(peft, peft_dir, num_shards=3)
    got = loaded(peft_dir, cfg, lora_alpha=alpha)
    for layer in range(cfg.text.num_hidden_layers):
        for proj in ("q_proj", "v_proj", "k_proj"):
            stem = f"language_model.base_model.model.model.layers.{layer}.self_attn.{proj}"
            name = f"language_model.model.layers.{layer}.self_attn.{proj}.weight"
            if proj == "k_proj":  # no adapter: untouched
                np.testing.assert_array_equal(got[name], peft[stem + ".weight"])
                continue
            base = peft[stem + ".base_layer.weight"].astype(np.float64)
            a = peft[stem + ".lora_A.default.weight"].astype(np.float64)
            b = peft[stem + ".lora_B.default.weight"].astype(np.float64)
            expected = base + (alpha / RANK) * (b @ a)
            assert np.abs(expected - base).max() > 1e-2  # the delta is really there
            np.testing.assert_allclose(got[name], expected, atol=1e-5, err_msg=name)


def test_half_precision_projections_stay_so_unless_lora_merged(tiny_model_dir, cfg, tmp_path):
    import mindspore as ms

    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    assert W.stored_weight_dtypes(tiny_model_dir) == {kind: "F16" for kind in kinds}
    peft_dir = copy_meta(tiny_model_dir, tmp_path / "peft")
    save_sharded(peft_layout(read_all(tiny_model_dir), lora_scale=0.5), peft_dir)
    assert W.stored_weight_dtypes(peft_dir) == {kind: "F16" for kind in kinds if kind not in ("q_proj", "v_proj")}
    assert W.stored_weight_dtypes(tmp_path) == {}  # no safetensors here
    language = PllavaLanguage.from_pretrained(peft_dir, cfg, max_len=64, jit=False)
    layer = language.lm.model.layers[0]
    # q and v are merged with their LoRA in float32, so the fused q/k/v stays float32
    assert not layer.self_attn.qkv_proj.packed and layer.self_attn.qkv_proj.weight.dtype == ms.float32
    kept = cpu_kernels.half_linear_vectorized()  # (without AVX-512 every weight stays float32)
    for linear in (layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj, language.lm.lm_head):
        assert linear.packed == kept and linear.weight.dtype == (ms.float16 if kept else ms.float32)


def test_vision_projections_stay_in_the_half_precision_the_checkpoint_stores(tiny_model_dir, cfg, tmp_path):
    """Stored in float16 (the tiny checkpoint), the tower's and the projector's projections keep
    float16 weights in panels where the half-precision kernel runs on AMX tiles; stored in
    float32, or in mixed dtypes, they stay float32."""
    import mindspore as ms

    assert W.stored_vision_dtype(tiny_model_dir) == "F16"
    kept = cpu_kernels.half_linear_vectorized() and cpu_kernels.half_linear_tiles()
    vision = PllavaVision.from_pretrained(tiny_model_dir, cfg)
    layer = vision.vision_tower.vision_model.encoder.layers[0]
    projections = (layer.self_attn.q_proj, layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2,
                   vision.multi_modal_projector.linear_1, vision.multi_modal_projector.linear_2)
    for linear in projections:
        assert linear.packed == kept and linear.weight.dtype == (ms.float16 if kept else ms.float32)
        assert linear.bias.dtype == ms.float32
    tensors = read_all(tiny_model_dir)
    wide = copy_meta(tiny_model_dir, tmp_path / "fp32")
    save_sharded({k: v.astype(np.float32) for k, v in tensors.items()}, wide)
    assert W.stored_vision_dtype(wide) == "F32"
    assert not PllavaVision.from_pretrained(wide, cfg).multi_modal_projector.linear_1.packed
    mixed = copy_meta(tiny_model_dir, tmp_path / "mixed")
    save_sharded({k: v.astype(np.float32) if k.endswith("linear_2.weight") else v for k, v in tensors.items()}, mixed)
    assert W.stored_vision_dtype(mixed) is None
    assert not PllavaVision.from_pretrained(mixed, cfg).vision_tower.vision_model.encoder.layers[0].mlp.fc1.packed
    assert W.stored_vision_dtype(tmp_path) is None  # no safetensors here


def test_values_half_precision_cannot_hold_are_named_when_rounded(tiny_model_dir, cfg, tmp_path, caplog):
    import mindspore as ms

    tensors = {k: v.astype(np.float32) for k, v in read_all(tiny_model_dir).items()}
    tensors["language_model.lm_head.weight"] += np.float32(1e-6)  # between float16 values
    d = copy_meta(tiny_model_dir, tmp_path / "fp32")
    save_sharded(tensors, d)
    assert W.stored_weight_dtypes(d)["lm_head"] == "F32"
    language = PllavaLanguage(cfg, max_len=64, jit=False, half_weights=(("lm_head", ms.float16),))
    with caplog.at_level("WARNING", logger="pllava.weights"):
        language.load(d)
    assert language.lm.lm_head.packed
    assert "cannot represent" in caplog.text and "language_model.lm_head.weight" in caplog.text
    assert "down_proj" not in caplog.text  # float32 weights are not checked


def test_dtypes_on_disk(tiny_model_dir, cfg, tmp_path):
    """fp32 and bf16 shards load to the same values as the fp16 original (bf16 rounded)."""
    tensors = read_all(tiny_model_dir)
    base = loaded(tiny_model_dir, cfg)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        d = copy_meta(tiny_model_dir, tmp_path / np.dtype(dtype).name)
        save_sharded({k: v.astype(np.float32).astype(dtype) for k, v in tensors.items()}, d)
        got = loaded(d, cfg)
        for name in base:
            expected = base[name].astype(dtype).astype(np.float32)
            np.testing.assert_array_equal(got[name], expected, err_msg=f"{np.dtype(dtype).name}: {name}")


def test_missing_key_is_named(tiny_model_dir, cfg, tmp_path):
    tensors = read_all(tiny_model_dir)
    gone = "language_model.model.layers.1.mlp.down_proj.weight"
    d = copy_meta(tiny_model_dir, tmp_path / "missing")
    save_sharded({k: v for k, v in tensors.items() if k != gone}, d)
    with pytest.raises(W.WeightsError, match=r"missing keys \(1\): " + gone.replace(".", r"\.")):
        PllavaLanguage.from_pretrained(d, cfg, max_len=64, jit=False)
    PllavaVision.from_pretrained(d, cfg)  # the vision side does not need it


def test_unexpected_and_misshaped_keys_are_named(tiny_model_dir, cfg, tmp_path):
    tensors = read_all(tiny_model_dir)
    bad = "multi_modal_projector.linear_1.bias"
    tensors[bad] = np.zeros(7, np.float16)
    tensors["multi_modal_projector.linear_3.weight"] = np.zeros((2, 2), np.float16)
    d = copy_meta(tiny_model_dir, tmp_path / "bad")
    save_sharded(tensors, d)
    with pytest.raises(W.WeightsError) as err:
        PllavaVision.from_pretrained(d, cfg)
    msg = str(err.value)
    assert "multi_modal_projector.linear_3.weight" in msg and "unexpected" in msg
    assert f"{bad}: checkpoint (7,) vs model (64,)" in msg


def test_unused_keys_are_dropped_silently(tiny_model_dir, cfg, tmp_path):
    tensors = read_all(tiny_model_dir)
    assert "image_newline" in tensors
    tensors["vision_tower.vision_model.embeddings.position_ids"] = np.arange(577)[None].astype(np.int64)
    tensors["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    d = copy_meta(tiny_model_dir, tmp_path / "extra")
    save_sharded(tensors, d)
    assert loaded(d, cfg).keys() == loaded(tiny_model_dir, cfg).keys()


def test_vision_side_streams_only_its_part(tiny_model_dir, cfg, tmp_path):
    """A server loading the vision side never materialises language tensors: with a 64 MiB
    language part, host allocations while loading stay far below it."""
    tensors = read_all(tiny_model_dir)
    tensors["language_model.model.embed_tokens.weight"] = np.ones((cfg.text.vocab_size, 64), np.float16)
    tensors["language_model.zz_padding_a"] = np.ones((32, 1 << 20), np.float16)
    d = copy_meta(tiny_model_dir, tmp_path / "big")
    save_sharded(tensors, d)
    tracemalloc.start()
    try:
        PllavaVision.from_pretrained(d, cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak host allocation {peak / 2**20:.1f} MiB while loading the vision side"


def test_convert_to_ckpt_and_load(tiny_model_dir, cfg, tmp_path):
    tensors = read_all(tiny_model_dir)
    peft_dir = copy_meta(tiny_model_dir, tmp_path / "peft")
    save_sharded(peft_layout(tensors, lora_scale=0.5, seed=5), peft_dir)
    ckpt = tmp_path / "model.ckpt"
    run = subprocess.run([sys.executable, "-m", "pllava.cli", "convert", str(peft_dir), "-o", str(ckpt),
                          "--lora-alpha", "16"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from_ckpt = loaded(ckpt, cfg, lora_alpha=16.0)
    from_st = loaded(peft_dir, cfg, lora_alpha=16.0)
    for name in from_st:
        np.testing.assert_allclose(from_ckpt[name], from_st[name], atol=1e-6, err_msg=name)
    with pytest.raises(W.WeightsError, match="--lora-alpha 16"):
        PllavaVision.from_pretrained(ckpt, cfg, lora_alpha=4.0)


def test_a_pllava_7b_layout_captions_as_its_weights_merged_by_hand(tmp_path, videos_dir):
    """``make-tiny --layout pllava`` (bf16, PEFT LoRA keys, PllavaConfig, no image_newline)
    captions exactly as the same weights merged by hand (W + alpha/r B A, float64) into an
    fp32 llava-hf folder; without the merge the tokens differ, so the LoRA counted."""
    def caption(model: Path) -> list[int]:
        run = subprocess.run([sys.executable, "-m", "pllava.cli", "caption", str(videos_dir / "orbit.mp4"), "--model",
                              str(model), "--json", "--max-new-tokens", "24"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout)["token_ids"]

    pllava_dir = tmp_path / "pllava"
    made = subprocess.run([sys.executable, "-m", "pllava.cli", "make-tiny", str(pllava_dir), "--layout", "pllava"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    config = json.loads((pllava_dir / "config.json").read_text())
    assert (config["model_type"], config["torch_dtype"], config["architectures"]) == (
        "llava", "bfloat16", ["PllavaForConditionalGeneration"])
    stored = read_all(pllava_dir)
    assert "image_newline" not in stored and {str(v.dtype) for v in stored.values()} == {"bfloat16"}
    prefix, scale = "language_model.base_model.model.", W.DEFAULT_LORA_ALPHA / tiny.PLLAVA_LORA_RANK
    merged, unmerged = {}, {}
    for name, value in stored.items():
        if ".lora_" in name:
            continue
        plain = ("language_model." + name[len(prefix):] if name.startswith(prefix) else name).replace(".base_layer", "")
        merged[plain] = unmerged[plain] = value.astype(np.float32)
        if ".base_layer." in name:
            stem = name[: -len(".base_layer.weight")]
            a, b = (stored[f"{stem}.lora_{x}.default.weight"].astype(np.float64) for x in "AB")
            merged[plain] = (value.astype(np.float64) + scale * (b @ a)).astype(np.float32)
    folders = {}
    for label, tensors in (("merged", merged), ("unmerged", unmerged)):
        folders[label] = copy_meta(pllava_dir, tmp_path / label)
        save_sharded(tensors, folders[label])
    tokens = caption(pllava_dir)
    assert tokens == caption(folders["merged"])
    assert tokens != caption(folders["unmerged"])


def test_a_folder_of_adapters_only_says_what_it_is(tiny_model_dir, cfg, tmp_path):
    """What a PLLaVA training run saves (LoRA and the projector only) is named as such."""
    peft = peft_layout(read_all(tiny_model_dir), lora_scale=0.1)
    adapters = copy_meta(tiny_model_dir, tmp_path / "adapters")
    save_sharded({k: v for k, v in peft.items() if ".lora_" in k or k.startswith("multi_modal_projector.")}, adapters)
    with pytest.raises(W.WeightsError, match=r"incomplete LoRA triples .* adapters without the weights they adapt.*"
                                             r"point --model at a full checkpoint"):
        PllavaLanguage.from_pretrained(adapters, cfg, max_len=64, jit=False)


def test_convert_keeps_bf16_and_stores_an_alpha_only_for_merged_lora(cfg, tiny_model_dir, tmp_path):
    """A bf16 checkpoint converts to a bf16 .ckpt (half the size of widening it) that loads to
    the same values; a checkpoint without LoRA stores no alpha, so any --lora-alpha loads it."""
    import mindspore as ms

    pllava_dir = tiny.make_tiny(tmp_path / "pllava", layout="pllava")
    for source, lora in ((pllava_dir, True), (tiny_model_dir, False)):
        ckpt = tmp_path / f"{source.name}.ckpt"
        run = subprocess.run([sys.executable, "-m", "pllava.cli", "convert", str(source), "-o", str(ckpt)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert ("LoRA merged with alpha 4" if lora else "no LoRA to merge") in run.stdout
        params = ms.load_checkpoint(str(ckpt))
        assert (W.CKPT_ALPHA_KEY in params) == lora
        if lora:
            k = "language_model.model.layers.0.self_attn.k_proj.weight"
            assert params[k].dtype == ms.bfloat16  # stored bf16, not widened
            source_cfg = PllavaConfig.from_pretrained(source)
            from_ckpt, from_st = loaded(ckpt, source_cfg), loaded(source, source_cfg)
            for name in from_st:
                np.testing.assert_array_equal(from_ckpt[name], from_st[name], err_msg=name)
        else:
            PllavaVision.from_pretrained(ckpt, cfg, lora_alpha=16.0)  # no alpha stored: nothing to refuse


def test_layout_names():
    assert W.canonical_name("model.language_model.layers.3.mlp.up_proj.weight") == "language_model.model.layers.3.mlp.up_proj.weight"
    assert W.canonical_name("lm_head.weight") == "language_model.lm_head.weight"
    assert W.canonical_name("model.vision_tower.vision_model.pre_layrnorm.bias") == "vision_tower.vision_model.pre_layrnorm.bias"
    assert W.canonical_name("vision_tower.encoder.layers.0.mlp.fc1.bias") == "vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"
    assert (W.canonical_name("language_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
            == "language_model.model.layers.0.self_attn.q_proj.weight")
    assert W.canonical_name("language_model.base_model.model.lm_head.weight") == "language_model.lm_head.weight"


def test_missing_shard_is_named(tiny_model_dir, tmp_path):
    d = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (d / victim).unlink()
    with pytest.raises(W.WeightsError, match=victim):
        list(W.iter_safetensors(d))


def test_make_tiny_writes_a_checkpoint_others_can_read(tmp_path):
    """Every file readable as the umask allows (safetensors alone writes shards 0600), so a
    container's unprivileged user reads a checkpoint made by another."""
    import os

    umask = os.umask(0o022)  # a shared checkpoint's usual umask, whatever this process's is
    try:
        tiny.make_tiny(tmp_path / "t")
    finally:
        os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "t").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_a_shard_this_user_cannot_read_says_so(tiny_model_dir):
    """Not safetensors' 'No such file or directory': who this process is and whose the file is."""
    with open_folder("pllava-locked-") as d:
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, d / f.name)
        shard = sorted(d.glob("*.safetensors"))[0]
        shard.chmod(0o600 if AS_ROOT else 0o000)  # not root: the owner itself, kept out by the mode
        with as_another_user() as me, pytest.raises(W.WeightsError) as err:
            list(W.iter_safetensors(d))
        assert str(err.value) == (f"{shard} cannot be read (Permission denied): this process runs as uid {me} and "
                                  f"the file belongs to uid {shard.stat().st_uid}; make the checkpoint readable to "
                                  "this user (chmod -R a+rX), or run as its owner")
