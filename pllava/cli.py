"""The ``pllava`` command: caption a video in-process, convert a checkpoint, make a tiny one."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from . import weights as W
from .prompt import DEFAULT_TEMPLATE, TEMPLATES
from .sampling import SamplingParams


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (HF layout) or a converted .ckpt file")
    p.add_argument("--device", default="CPU", choices=["CPU", "GPU", "Ascend"])
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on Ascend, float16 on GPU)")
    p.add_argument("--lora-alpha", type=float, default=W.DEFAULT_LORA_ALPHA,
                   help="LoRA alpha for PEFT checkpoints, scaling alpha/r (default 4, PLLaVA's inference value)")
    p.add_argument("--num-frames", type=int, help="frames sampled per video (default: the checkpoint's)")
    p.add_argument("--max-context", type=int, help="KV-cache length (default: max_position_embeddings)")


def add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="the question (default: 'Describe the video in details.')")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, choices=sorted(TEMPLATES),
                   help="conversation template (default: plain, the official demo)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop))


def cmd_caption(args) -> int:
    from .pipeline import Captioner, CaptionerSettings, CaptionResult

    if (args.video is None) == (args.frames is None):
        raise ValueError("give a video or --frames DIR (one of them)")
    if args.frames is not None:
        from pllava_client.frames import frame_files

        source = [str(path) for path in frame_files(args.frames)]
    else:
        source = args.video
    settings = CaptionerSettings(device=args.device, device_id=args.device_id, dtype=args.dtype,
                                 lora_alpha=args.lora_alpha, num_frames=args.num_frames,
                                 max_context=args.max_context)
    t0 = time.perf_counter()
    captioner = Captioner(args.model, settings)
    load_s = time.perf_counter() - t0
    params = sampling_params(args)

    def run(stream: bool) -> tuple[CaptionResult, float]:
        result = CaptionResult()
        start = time.perf_counter()
        for piece in captioner.caption(source, args.prompt, args.template, params, result):
            if stream:
                print(piece, end="", flush=True)
        if stream:
            print(flush=True)
        return result, time.perf_counter() - start

    if args.benchmark:
        run(stream=False)  # warm-up: compiles the graphs, as the reference's first round does
        result, elapsed = run(stream=False)
        print_benchmark(captioner, result, elapsed, load_s)
        return 0
    result, _ = run(stream=not args.json)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    return 0


def print_benchmark(captioner, result, elapsed: float, load_s: float) -> None:
    """The MindSpore port's figure (ids in the output / whole answer call, second run) and
    the honest split beside it."""
    t = result.timings
    generated = len(result.token_ids)
    rows = [
        ("model", str(captioner.model_dir)),
        ("device / dtype", f"{captioner.settings.device} / {captioner.dtype}"),
        ("frames / visual tokens", f"{result.num_frames} / {result.num_visual_tokens}"),
        ("prompt text tokens", str(len(result.prompt_token_ids))),
        ("generated tokens", str(generated)),
        ("tokens/s, port method (prompt ids + generated) / call", f"{(len(result.prompt_token_ids) + generated) / elapsed:.2f}"),
        ("tokens/s, generated / call", f"{generated / elapsed:.2f}"),
        ("decode-only tokens/s", f"{t['decode_tokens_per_s']:.2f}"),
        ("time to first token (ms)", f"{t['time_to_first_token_ms']:.1f}"),
        ("video decode + preprocess (ms)", f"{t['video_decode_ms']:.1f}"),
        ("vision encode (ms)", f"{t['encode_ms']:.1f}"),
        ("prefill (ms)", f"{t['prefill_ms']:.1f}"),
        ("whole call, second run (s)", f"{elapsed:.3f}"),
        ("weights load (s)", f"{load_s:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_convert(args) -> int:
    import mindspore as ms
    import numpy as np

    out = Path(args.output)
    params = []
    for name, array in W.iter_safetensors(args.model_dir, W.PARTS, args.lora_alpha):
        # bf16 stays bf16 (numpy has no bf16 arithmetic for MindSpore to take it from directly): a
        # 7B bf16 checkpoint is held and written at 14 GB, not widened to 28
        data = (ms.Tensor(array.astype(np.float32), dtype=ms.bfloat16) if array.dtype.name == "bfloat16"
                else ms.Tensor(array))
        params.append({"name": name, "data": data})
    merged = W.has_lora(args.model_dir)
    if merged:  # the alpha the LoRA was merged with; a later load with another one is refused
        params.append({"name": W.CKPT_ALPHA_KEY, "data": ms.Tensor(np.array([args.lora_alpha], dtype=np.float32))})
    ms.save_checkpoint(params, str(out))
    print(f"wrote {out} ({len(params) - merged} tensors, "
          + (f"LoRA merged with alpha {args.lora_alpha:g})" if merged else "no LoRA to merge)"))
    return 0


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny

    out = make_tiny(args.output, seed=args.seed, num_frames=args.num_frames, preset=args.preset, layout=args.layout)
    print(f"wrote a tiny random PLLaVA checkpoint to {out}")
    return 0


def cmd_up(args) -> int:
    # The launcher is serving code (it talks gRPC health); the model package only calls it.
    from pllava_serving.launcher import (DEFAULT_GRACE_S, LaunchError, default_certs_dir, launch, parse_setting,
                                         run_foreground)

    decoder = dict(parse_setting(s) for s in args.decoder_setting)
    encoder = dict(parse_setting(s) for s in args.encoder_setting)
    openai = dict(parse_setting(s) for s in args.openai_setting)
    for name in ("max_batch", "max_context", "max_queue"):
        if getattr(args, name) is not None:
            decoder[name] = getattr(args, name)
    try:
        cluster = launch(args.model, encoders=args.encoders, port=args.port, host=args.host,
                         encoder_port=args.encoder_port, device=args.device, dtype=args.dtype,
                         ready_timeout=args.ready_timeout, encoder_settings=encoder,
                         decoder_settings=decoder, openai_port=args.openai_port, openai_settings=openai,
                         metrics_port=args.metrics_port,
                         secure=default_certs_dir() if args.secure == "" else args.secure)
    except (LaunchError, ValueError, FileExistsError) as exc:
        print(f"pllava up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        _announce(cluster)
    except (OSError, ValueError):  # stdout went away: the servers run on until a signal stops them
        pass
    except KeyboardInterrupt:
        cluster.stop(DEFAULT_GRACE_S)
        return 130
    return run_foreground(cluster, grace=DEFAULT_GRACE_S, restart=not args.no_restart)


def _announce(cluster) -> None:
    """Where the servers of ``pllava up`` listen, and a command to try them."""
    encoders = ", ".join(e.address for e in cluster.encoders)
    print(f"pllava up: decoder at {cluster.address} ({len(cluster.encoders)} encoder(s) at "
          f"{encoders}); Ctrl-C stops them", flush=True)
    if cluster.openai_url is not None:
        key = (f" (plain HTTP; API key: the token in {cluster.certs.token.resolve()})"
               if cluster.certs is not None else "")
        print(f"pllava up: OpenAI-compatible API at {cluster.openai_url}{key}", flush=True)
    for server in cluster.servers:
        if server.metrics_url:
            print(f"pllava up: {server.name} metrics at {server.metrics_url}", flush=True)
    if cluster.certs is None:
        print(f"  try: pllava-caption VIDEO --server {cluster.address}", flush=True)
    else:
        c = cluster.certs

        def q(path: Path) -> str:
            return shlex.quote(str(path.resolve()))
        print(f"  both hops use TLS with client certificates and the bearer token in {q(c.token)}", flush=True)
        print(f"  try: PLLAVA_TOKEN=$(cat {q(c.token)}) pllava-caption VIDEO --server {cluster.address} "
              f"--tls-ca {q(c.ca)} --tls-cert {q(c.client_cert)} --tls-key {q(c.client_key)}", flush=True)


def cmd_make_certs(args) -> int:
    from pllava_serving.certs import DEFAULT_HOSTS, make_certs

    try:
        certs = make_certs(args.folder, [*DEFAULT_HOSTS, *args.host], days=args.days, overwrite=args.force)
    except FileExistsError as exc:
        print(f"pllava make-certs: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a CA, a server certificate for {', '.join([*DEFAULT_HOSTS, *args.host])}, a client "
          f"certificate and a token to {certs.folder} (keys readable only by you; ca-key.pem is needed "
          "only to sign more certificates: keep it out of folders that servers or containers see)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pllava", description="PLLaVA video captioning on MindSpore")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption a video in this process, streaming the text")
    p.add_argument("video", nargs="?", help="video file (or a still image)")
    p.add_argument("--frames", metavar="DIR",
                   help="instead of a video: frames you sampled yourself, the .jpg/.jpeg/.png/.webp files in "
                        "DIR in sorted name order, all of one size")
    add_model_args(p)
    add_request_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--benchmark", action="store_true", help="run twice and report speed of the second run")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("convert", help="write a MindSpore .ckpt (LoRA merged) from a safetensors checkpoint")
    p.add_argument("model_dir")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--lora-alpha", type=float, default=W.DEFAULT_LORA_ALPHA)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in a real checkpoint's layout")
    p.add_argument("output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, default=4)
    p.add_argument("--preset", choices=("tiny", "serving"), default="tiny",
                   help="tiny (tests) or serving (benchmarks: CLIP 512x8, LLaMA 1024x12, vocab 32064)")
    p.add_argument("--layout", choices=("llava-hf", "pllava"), default="llava-hf",
                   help="llava-hf (llava-v1.6-vicuna-7b-hf: fp16, default) or pllava (ermu2001/pllava-7b: "
                        "bf16, PEFT LoRA keys on q/v, no image_newline)")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("up", help="run N encoder servers and one decoder server here, no Docker")
    p.add_argument("--model", help="checkpoint folder (default: a tiny random one, made once in "
                                   "~/.cache/pllava/tiny)")
    p.add_argument("--encoders", type=int, default=1, help="encoder servers to start (default 1)")
    p.add_argument("--port", type=int, default=50052, help="decoder port (default 50052; 0 = any free)")
    p.add_argument("--host", default="127.0.0.1", help="decoder bind address (default 127.0.0.1)")
    p.add_argument("--encoder-port", type=int, default=0,
                   help="first encoder port, the others follow (default 0: free ports)")
    p.add_argument("--device", choices=["CPU", "GPU", "Ascend"], help="device of every server")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype")
    p.add_argument("--metrics-port", type=int, default=0, metavar="BASE",
                   help="serve Prometheus metrics: the decoder's at BASE, encoder i's at BASE+1+i "
                        "(default 0 = none)")
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds to wait for every server to be SERVING (default 600)")
    p.add_argument("--no-restart", action="store_true",
                   help="stop every server when one exits (default: start it again on its port, after a "
                        "back-off of 1 s doubling to 30 s, and keep the others running)")
    p.add_argument("--max-batch", type=int, help="decoder: sequences decoded together (default 8)")
    p.add_argument("--max-context", type=int, help="decoder: tokens per sequence (default: the model's, "
                                                   "at most 4096)")
    p.add_argument("--max-queue", type=int, help="decoder: requests without a token yet (default 32)")
    p.add_argument("--decoder-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="any other decoder setting (see pllava-decoder --help), e.g. visual_cache_bytes=0; "
                        "repeatable")
    p.add_argument("--encoder-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="any encoder setting (see pllava-encoder --help), e.g. video_workers=4; repeatable")
    p.add_argument("--openai-port", type=int, metavar="PORT",
                   help="also start the OpenAI-compatible HTTP API (pllava-openai) on this port, on --host "
                        "(0 = any free port; default: not started)")
    p.add_argument("--openai-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="any pllava-openai setting, e.g. auth_token_file=keys.txt; repeatable")
    p.add_argument("--secure", nargs="?", const="", metavar="DIR",
                   help="TLS with client certificates and a bearer token on both hops, from the files "
                        "of `pllava make-certs` in DIR (made there if it holds none; default DIR "
                        "~/.config/pllava/certs)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("make-certs", help="write a CA, server and client certificates and a token for TLS")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP address the server certificate is valid for (repeatable; "
                        "always: localhost, 127.0.0.1, ::1, encoder, decoder)")
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.add_argument("--force", action="store_true", help="overwrite the files if DIR already holds them")
    p.set_defaults(func=cmd_make_certs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .generation import SequenceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # user errors: one clear line, no traceback
        print(f"pllava: error: {exc}", file=sys.stderr)
        return 2
    except SequenceError as exc:  # the model failed on this request (NaN logits, ...)
        print(f"pllava: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
