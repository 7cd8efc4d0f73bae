"""Numerical parity with HuggingFace transformers (PyTorch CPU) on a checkpoint that
transformers itself saved: CLIP features, projector + pooling, logits, greedy tokens."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import reference as R
from pllava import cpu_kernels
from pllava.config import PllavaConfig
from pllava.model import PllavaLanguage, PllavaVision
from pllava.projector import adaptive_pool_matrix

PROMPT = [1, 5, 9, 300, 17, 33, 2, 41]  # one <image> (id 300) inside text


@pytest.fixture(scope="module")
def hf(hf_tiny_dir):
    return R.load_hf(hf_tiny_dir)


@pytest.fixture(scope="module")
def cfg(hf_tiny_dir):
    return PllavaConfig.from_pretrained(hf_tiny_dir).with_frames(4, (4, 2, 2))


@pytest.fixture(scope="module")
def vision(hf_tiny_dir, cfg):
    return PllavaVision.from_pretrained(hf_tiny_dir, cfg)


@pytest.fixture(scope="module")
def language(hf_tiny_dir, cfg):
    return PllavaLanguage.from_pretrained(hf_tiny_dir, cfg, num_slots=2, max_len=256)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((4, 3, 56, 56)).astype(np.float32)


def test_clip_features_at_selected_layer(hf, vision, pixels):
    ours = vision.encode_frames(pixels).asnumpy()
    ref = R.clip_features(hf, pixels)
    assert ours.shape == ref.shape == (4, 16, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_selected_layer_is_not_the_last(hf, vision, pixels):
    """hidden_states[-2] is layer 2 of 3: the last layer's output must differ."""
    import torch

    with torch.no_grad():
        last = hf.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-1][:, 1:]
    assert np.abs(vision.encode_frames(pixels).asnumpy() - last.numpy()).max() > 1e-3


@pytest.mark.parametrize("frames, num_frames, pooling", [
    (4, 4, (4, 2, 2)),   # official shape family: 2x2 spatial means
    (4, 4, (3, 3, 3)),   # non-divisible: overlapping bins on every axis
    (2, 4, (4, 2, 2)),   # fewer frames than num_frames: repeat_interleave then pool
    (1, 4, (2, 3, 2)),   # a still image repeated, non-divisible
])
def test_projector_and_pooling_match_torch(hf, hf_tiny_dir, frames, num_frames, pooling):
    cfg = PllavaConfig.from_pretrained(hf_tiny_dir).with_frames(num_frames, pooling)
    vision = PllavaVision.from_pretrained(hf_tiny_dir, cfg)
    features = np.random.default_rng(1).standard_normal((frames, 16, 32)).astype(np.float32)
    import mindspore as ms

    ours = vision.project(ms.Tensor(features)).asnumpy()
    ref = R.project_and_pool(hf, features, num_frames, pooling)
    assert ours.shape == ref.shape == (int(np.prod(pooling)), 64)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("frames", [1, 3, 4])
def test_compiled_frame_calls_give_transformers_visual_tokens(hf, vision, frames):
    """encode_videos runs the tower and linear_1/GELU as compiled graphs of
    ``frames_per_call`` frames and a lone odd frame: 1, 3 (a call and a lone frame) and 4
    frames give transformers' CLIP -> projector -> pooling."""
    pixels = np.random.default_rng(frames).standard_normal((frames, 3, 56, 56)).astype(np.float32)
    assert vision.frames_per_call == 2
    ours = vision.encode_videos([pixels])[0]
    ref = R.project_and_pool(hf, R.clip_features(hf, pixels), vision.cfg.num_frames, vision.cfg.pooling_shape)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("frames", [1, 3])
def test_the_tower_on_the_cpu_kernels_gives_transformers_visual_tokens(tiny_model_dir, frames):
    """The tiny PLLaVA (336 px, heads 16 wide, float16 weights): its tower's attention runs
    the project's kernel, and where the CPU has AMX tiles its projections keep their float16
    weights on the half-precision kernel; 1 and 3 frames give transformers' visual tokens."""
    from pllava import cpu_kernels

    hf = R.load_hf(tiny_model_dir)
    cfg = PllavaConfig.from_pretrained(tiny_model_dir)
    vision = PllavaVision.from_pretrained(tiny_model_dir, cfg)
    layer = vision.vision_tower.vision_model.encoder.layers[0]
    assert layer.self_attn.attention_op is not None
    assert layer.mlp.fc1.packed == (cpu_kernels.half_linear_vectorized() and cpu_kernels.half_linear_tiles())
    size = cfg.vision.image_size
    pixels = np.random.default_rng(frames).standard_normal((frames, 3, size, size)).astype(np.float32)
    ours = vision.encode_videos([pixels])[0]
    ref = R.project_and_pool(hf, R.clip_features(hf, pixels), cfg.num_frames, cfg.pooling_shape)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_pooling_before_gelu_would_differ(hf, vision):
    """Negative control: pooling the CLIP features before linear_1/GELU is not equivalent,
    so the parity test above can tell the orders apart."""
    import mindspore as ms
    import torch

    features = np.random.default_rng(2).standard_normal((4, 16, 32)).astype(np.float32)
    ref = R.project_and_pool(hf, features, 4, (4, 2, 2))
    x = features.reshape(4, 4, 4, 32)
    pooled = np.einsum("ah,bw,thwd->tabd", adaptive_pool_matrix(4, 2), adaptive_pool_matrix(4, 2), x).reshape(16, 32)
    proj = hf.model.multi_modal_projector
    with torch.no_grad():
        early = proj.linear_2(proj.act(proj.linear_1(torch.from_numpy(pooled.astype(np.float32))))).numpy()
    assert np.abs(early - ref).max() > 1e-3
    ours = vision.project(ms.Tensor(features)).asnumpy()
    assert np.abs(ours - ref).max() < 1e-5


def test_adaptive_pool_matrix_matches_torch():
    import torch

    for size_in, size_out in [(24, 12), (7, 3), (4, 16), (5, 5), (10, 4)]:
        x = torch.randn(1, 1, size_in)
        ref = torch.nn.AdaptiveAvgPool1d(size_out)(x)[0, 0].numpy()
        np.testing.assert_allclose(adaptive_pool_matrix(size_in, size_out) @ x[0, 0].numpy(), ref, atol=1e-6)


def test_prompt_logits_match(hf, language, vision, pixels):
    visual = vision.encode_videos([pixels])[0]
    embeds = language.merge_embeddings(PROMPT, visual)
    assert embeds.shape == (1, len(PROMPT) - 1 + 16, 64)
    ours = language.prefill(0, embeds, logit_index=range(embeds.shape[1]))
    ref = R.logits(hf, R.merged_embeddings(hf, PROMPT, visual))
    assert ours.shape == ref.shape == (embeds.shape[1], 320)
    assert np.abs(ours - ref).max() <= 1e-4


def greedy_with_cache(language, slot, embeds, steps):
    """Greedy tokens through prefill + the batched decode step, other slots idle."""
    token = int(language.prefill(slot, embeds)[0].argmax())
    tokens, pos = [token], embeds.shape[1]
    for _ in range(steps - 1):
        token = int(language.decode(np.array([token]), np.array([pos]), np.array([slot]))[0].argmax())
        tokens.append(token)
        pos += 1
    return tokens


def test_greedy_tokens_match_transformers(hf, language, vision, pixels):
    visual = vision.encode_videos([pixels])[0]
    ours = greedy_with_cache(language, 1, language.merge_embeddings(PROMPT, visual), 40)
    ref = R.greedy(hf, R.merged_embeddings(hf, PROMPT, visual), 40)
    assert ours == ref
    assert len(set(ours)) > 3  # a real sequence, not one token repeated


def test_cached_decode_equals_full_recompute(language, vision, pixels):
    """Logits of each decode step equal a fresh prefill of the whole sequence so far."""
    visual = vision.encode_videos([pixels])[0]
    embeds = language.merge_embeddings(PROMPT, visual)
    tokens = greedy_with_cache(language, 0, embeds, 12)
    full_ids = list(PROMPT) + tokens[:-1]
    full = language.merge_embeddings(full_ids, visual)
    n = embeds.shape[1]
    logits_full = language.prefill(1, full, logit_index=range(n - 1, full.shape[1]))
    assert [int(x) for x in logits_full.argmax(-1)] == tokens
    # and the values themselves, step by step
    token = int(language.prefill(0, embeds)[0].argmax())
    for k in range(1, 12):
        step = language.decode(np.array([token]), np.array([n + k - 1]), np.array([0]))[0]
        np.testing.assert_allclose(step, logits_full[k], atol=1e-4)
        token = int(step.argmax())


@pytest.fixture(scope="module")
def chunked(hf_tiny_dir, cfg):
    """Small chunks and context buckets, so one prompt crosses many of each."""
    return PllavaLanguage.from_pretrained(hf_tiny_dir, cfg, num_slots=3, max_len=512, prefill_chunk=32,
                                          min_context=64)


def long_prompt(n_text: int) -> list[int]:
    ids = np.random.default_rng(1).integers(3, 300, n_text).tolist()
    return [1] + ids[: n_text // 3] + [300] + ids[n_text // 3:]


def test_long_prompt_across_chunks_and_buckets_matches_transformers(hf, chunked, vision, pixels):
    visual = vision.encode_videos([pixels])[0]
    ids = long_prompt(220)
    embeds = chunked.merge_embeddings(ids, visual)
    n = embeds.shape[1]
    chunks = chunked.plan.chunks(n)
    assert len(chunks) >= 7 and len({c.context for c in chunks}) >= 3  # really crosses them
    ours = chunked.prefill(2, embeds, logit_index=range(n))
    ref = R.logits(hf, R.merged_embeddings(hf, ids, visual))
    assert np.abs(ours - ref).max() <= 1e-4
    # greedy decode from position ~237 past the 256 context bucket, in the last slot
    tokens = greedy_with_cache(chunked, 2, embeds, 40)
    assert tokens == R.greedy(hf, R.merged_embeddings(hf, ids, visual), 40)


def test_batched_decode_at_mixed_lengths_equals_each_alone(chunked, vision, pixels):
    """Three sequences of different lengths (and context buckets) decoded in one padded
    batch give the logits each gets alone."""
    visual = vision.encode_videos([pixels])[0]
    prompts = [long_prompt(n) for n in (10, 90, 200)]
    check_batched_decode(chunked, visual, prompts, [0, 1, 2])


def test_batched_decode_over_every_slot_and_the_whole_context_equals_each_alone(chunked, vision, pixels):
    """All slots x max_len: the step attends over the cache in place, rows in slot order,
    whatever order the caller gives, and with one slot idle (two sequences run at the batch
    bucket of 3)."""
    visual = vision.encode_videos([pixels])[0]
    check_batched_decode(chunked, visual, [long_prompt(n) for n in (300, 40, 120)], [2, 0, 1])
    check_batched_decode(chunked, visual, [long_prompt(n) for n in (40, 300)], [2, 0])


def test_decode_split_into_short_and_long_groups_equals_each_alone(chunked, vision, pixels):
    """When two steps cost less than one (here: forced through the cost table, as without the
    CPU kernel), the short sequences run at their context bucket and the long one at its own;
    in the step of every slot, the long sequence's slot feeds a dummy row that must not touch
    its cache."""
    visual = vision.encode_videos([pixels])[0]
    original = chunked.decode_cost
    try:
        prompts = [long_prompt(n) for n in (4, 5, 204)]
        lengths = sorted(chunked.merge_embeddings(p, visual).shape[1] + 1 for p in prompts)
        chunked.decode_cost = replace(original, table={(b, c): float(b * c) for (b, c) in original.table},
                                      live_rows=False)
        assert chunked.decode_cost.best_split(lengths) == 2
        check_batched_decode(chunked, visual, prompts, [1, 2, 0])
        chunked.decode_cost = replace(original, table={key: 1.0 for key in original.table})  # one step wins
        assert chunked.decode_cost.best_split(lengths) == 0
        check_batched_decode(chunked, visual, prompts, [1, 2, 0])
    finally:
        chunked.decode_cost = original


def check_batched_decode(chunked, visual, prompts, slots):
    embeds = [chunked.merge_embeddings(p, visual) for p in prompts]
    first = [int(chunked.prefill(slot, e)[0].argmax()) for slot, e in zip(slots, embeds)]
    positions = np.array([e.shape[1] for e in embeds])
    together = chunked.decode(np.array(first), positions, np.array(slots))
    for i, slot in enumerate(slots):
        chunked.prefill(slot, embeds[i])  # rewrite the slot, then decode it alone
        alone = chunked.decode(np.array([first[i]]), positions[i:i + 1], np.array([slot]))[0]
        np.testing.assert_allclose(together[i], alone, atol=1e-5)


def test_single_slot_at_the_whole_context_matches_transformers(hf_tiny_dir, cfg, hf, vision, pixels):
    """One slot (the in-process captioner's shape): prefill chunks and decode steps that
    reach max_len attend over the cache in place."""
    single = PllavaLanguage.from_pretrained(hf_tiny_dir, cfg, num_slots=1, max_len=256, prefill_chunk=32,
                                            min_context=64)
    visual = vision.encode_videos([pixels])[0]
    ids = long_prompt(170)
    embeds = single.merge_embeddings(ids, visual)
    assert single.plan.chunks(embeds.shape[1])[-1].context == 256 == single.max_len
    assert greedy_with_cache(single, 0, embeds, 40) == R.greedy(hf, R.merged_embeddings(hf, ids, visual), 40)


def test_rotate_half_matrix_is_exact():
    from pllava.layers import rotate_half_matrix

    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_array_equal(x @ rotate_half_matrix(64), np.concatenate((-x[:, 32:], x[:, :32]), -1))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_a_half_precision_checkpoint_keeps_its_weights_so_and_matches_transformers(
        hf_tiny_dir, tmp_path, half, vision, pixels):
    """Checkpoints store their weights in half precision: the language model's linear layers
    keep them so (read through the CPU kernel), and transformers in float32 on the very same
    weights gives the same logits and greedy tokens."""
    import mindspore as ms
    import torch

    folder = tmp_path / half
    R.load_hf(hf_tiny_dir).to(getattr(torch, half)).save_pretrained(folder)
    hf = R.load_hf(folder)  # float32 again: the half values, exactly
    cfg = PllavaConfig.from_pretrained(folder).with_frames(4, (4, 2, 2))
    language = PllavaLanguage.from_pretrained(folder, cfg, num_slots=1, max_len=256)
    layer = language.lm.model.layers[0]
    kept = cpu_kernels.half_linear_vectorized()  # (without AVX-512: float32 weights, MindSpore's matmul)
    for linear in (language.lm.lm_head, layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                   layer.mlp.down_proj):
        assert linear.packed == kept and linear.weight.dtype == (getattr(ms, half) if kept else ms.float32)
    assert language.lm.model.embed_tokens.weight.dtype == ms.float32
    visual = vision.encode_videos([pixels])[0]
    embeds = language.merge_embeddings(PROMPT, visual)
    ours = language.prefill(0, embeds, logit_index=range(embeds.shape[1]))
    ref = R.logits(hf, R.merged_embeddings(hf, PROMPT, visual))
    assert np.abs(ours - ref).max() <= 1e-4
    assert greedy_with_cache(language, 0, embeds, 30) == R.greedy(hf, R.merged_embeddings(hf, PROMPT, visual), 30)


def test_prompts_sharing_leading_text_match_transformers(hf, chunked, vision, pixels, tiny_model_dir):
    """Prompts whose first 90 text ids (across two context blocks) are the same: the second,
    admitted beside the first, gets those rows copied from the first one's slot, the third
    finds them in the slot it takes; each one's greedy tokens are transformers' for it alone."""
    from engine_runs import run_batches
    from pllava.generation import Engine, Request
    from pllava.sampling import SamplingParams
    from pllava.tokenizer import Tokenizer

    visual = vision.encode_videos([pixels])[0]
    rng = np.random.default_rng(2)
    lead = [1] + rng.integers(3, 300, 89).tolist()
    prompts = [lead + [300] + rng.integers(3, 300, n).tolist() for n in (5, 9, 7)]
    visuals = [visual, visual[::-1].copy(), visual * 0.5]
    requests = [Request(p, v, SamplingParams(max_new_tokens=20)) for p, v in zip(prompts, visuals)]
    engine = Engine(chunked, Tokenizer.from_pretrained(tiny_model_dir), eos_token_id=-1)  # (text unused)
    tokens, stats = run_batches(engine, (requests[:2], requests[2:]))
    assert [stats[r.request_id].reused_tokens for r in requests] == [0, 90, 90]
    for r in requests:
        assert tokens[r.request_id] == R.greedy(hf, R.merged_embeddings(hf, r.prompt_ids, r.visual), 20)


def test_a_checkpoint_with_tied_word_embeddings_matches_transformers(tmp_path, pixels):
    """tie_word_embeddings: transformers saves no lm_head and takes the logits from the
    embedding table; ours reads the flag from config.json and does the same."""
    from safetensors import safe_open

    R.save_tiny_llava(tmp_path, seed=1, tie_word_embeddings=True)
    saved = [k for f in tmp_path.glob("*.safetensors") for k in safe_open(f, "np").keys()]
    assert saved and not any("lm_head" in k for k in saved)
    hf = R.load_hf(tmp_path)
    cfg = PllavaConfig.from_pretrained(tmp_path).with_frames(4, (4, 2, 2))
    assert cfg.text.tie_word_embeddings
    language = PllavaLanguage.from_pretrained(tmp_path, cfg, num_slots=1, max_len=256)
    assert language.lm.lm_head is None
    visual = PllavaVision.from_pretrained(tmp_path, cfg).encode_videos([pixels])[0]
    embeds = language.merge_embeddings(PROMPT, visual)
    ours = language.prefill(0, embeds, logit_index=range(embeds.shape[1]))
    ref = R.logits(hf, R.merged_embeddings(hf, PROMPT, visual))
    assert np.abs(ours - ref).max() <= 1e-4
    assert greedy_with_cache(language, 0, embeds, 20) == R.greedy(hf, R.merged_embeddings(hf, PROMPT, visual), 20)
