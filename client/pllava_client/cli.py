"""``pllava-caption``: caption a video through a PLLaVA decoder server.

    pllava-caption video.mp4 --server localhost:50052 [--prompt TEXT] [--json]

Streams the caption to stdout as it is generated, or with ``--json`` prints one JSON object
with the keys of the in-process ``pllava caption --json``. A refused or failed call exits 1
and prints ``error: STATUS_NAME: message`` on stderr; a video that cannot be read exits 2.
The server address defaults to ``$PLLAVA_SERVER`` or ``localhost:50052``; ``-`` reads the
video from stdin.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .client import CaptionError, Client

DEFAULT_SERVER = "localhost:50052"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pllava-caption",
                                description="Caption a video through a PLLaVA decoder server.")
    p.add_argument("video", help="video file (or a still image); - reads stdin")
    p.add_argument("--server", default=os.environ.get("PLLAVA_SERVER", DEFAULT_SERVER),
                   metavar="HOST:PORT",
                   help="decoder address, any gRPC target (default: $PLLAVA_SERVER or "
                        f"{DEFAULT_SERVER})")
    p.add_argument("--prompt", help="the question (default: the server's)")
    p.add_argument("--template", help="conversation template (default: the server's; "
                                      "GetInfo lists the names)")
    p.add_argument("--num-frames", type=int, default=0, metavar="N",
                   help="frames sampled from the video (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=0, metavar="N",
                   help="most tokens to generate (default: the server's)")
    p.add_argument("--temperature", type=float, help="0 = greedy (the server's default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (as `pllava caption --json`) instead of text")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="deadline of the whole call in seconds (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_frames < 0 or args.max_new_tokens < 0:
        print("error: --num-frames and --max-new-tokens cannot be negative", file=sys.stderr)
        return 2
    video = sys.stdin.buffer if args.video == "-" else args.video
    stream = None
    with Client(args.server, timeout=args.timeout) as client:
        try:
            stream = client.caption(
                video, args.prompt, template=args.template, num_frames=args.num_frames,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=args.stop)
            for piece in stream:
                if not args.json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except (OSError, ValueError, TypeError) as exc:  # the video could not be read or sent
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except CaptionError as err:
            if not args.json and stream is not None and stream.text:
                print(flush=True)  # end the partial caption's line
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            print(file=sys.stderr)
            return 130
    if args.json:
        print(json.dumps(stream.result.to_json(), ensure_ascii=False))
    else:
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
