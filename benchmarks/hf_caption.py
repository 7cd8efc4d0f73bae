"""Caption one video with transformers, as ``pllava caption --json`` does with our engine.

    python benchmarks/hf_caption.py VIDEO --model DIR [--num-frames 16] [--max-new-tokens 32]

The benchmark runs this in a subprocess to measure its peak RSS. Frames are read and
preprocessed by ``pllava.video`` (numpy/PIL only, the same pixels transformers' CLIP
processor gives), then everything else is transformers (``hf_pllava``). Prints one JSON
object: token_ids, num_visual_tokens, num_frames, prompt length and timings in seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_pllava as H  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("video")
    p.add_argument("--model", required=True)
    p.add_argument("--num-frames", type=int, required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt", default=None)
    p.add_argument("--template", default="plain")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    from pllava.config import PllavaConfig, PreprocessorConfig
    from pllava.prompt import DEFAULT_QUESTION, build_prompt
    from pllava.tokenizer import Tokenizer
    from pllava.video import load_frames, preprocess

    start = time.perf_counter()
    cfg = PllavaConfig.from_pretrained(args.model).with_frames(args.num_frames)
    tokenizer = Tokenizer.from_pretrained(args.model)
    hf = H.load(args.model)
    loaded = time.perf_counter()
    frames = load_frames(args.video, cfg.num_frames)
    pixels = preprocess(frames.frames, PreprocessorConfig.from_pretrained(args.model))
    visual = H.visual_tokens(hf, pixels, cfg.num_frames, cfg.pooling_shape)
    encoded = time.perf_counter()
    ids = tokenizer.encode(build_prompt(args.prompt or DEFAULT_QUESTION, args.template))
    gen = H.greedy(hf, H.embeddings(hf, ids, visual), args.max_new_tokens, tokenizer.eos_token_id)
    done = time.perf_counter()
    print(json.dumps({
        "token_ids": gen.tokens[0], "num_visual_tokens": int(visual.shape[0]), "num_frames": len(frames.frames),
        "prompt_positions": len(ids) - 1 + int(visual.shape[0]),
        "timings": {"load_s": loaded - start, "encode_s": encoded - loaded, "prefill_s": gen.prefill_s,
                    "decode_s": gen.decode_s, "total_s": done - start},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
