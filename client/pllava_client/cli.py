"""``pllava-caption``: caption a video, or a whole collection, through PLLaVA decoder servers.

    pllava-caption video.mp4 --server localhost:50052 [--prompt TEXT] [--json]
    pllava-caption --frames DIR_OF_IMAGES [--prompt TEXT] [--json]
    pllava-caption DIR|GLOB|LIST.txt ... --out captions.jsonl [--concurrency N] [--retries N]

One video: streams the caption to stdout as it is generated, or with ``--json`` prints one
JSON object with the keys of the in-process ``pllava caption --json``. A refused or failed
call exits 1 and prints ``error: STATUS_NAME: message`` on stderr; a video that cannot be read
exits 2. ``-`` reads the video from stdin.

``--frames DIR``: the video was decoded and sampled already; the JPEG, PNG and WebP files in
DIR, in sorted name order, are its frames (see :mod:`pllava_client.frames`). Output and exit
statuses are those of one video.

A collection (``--out``): folders (searched recursively for video and image files), glob
patterns, ``.txt`` lists of paths and single files are captioned ``--concurrency`` at a time
(default: the decoder's batch size times the number of decoders). Each result is appended
to the ``--out`` JSON-lines file as it finishes (see :mod:`pllava_client.collection`); a
rerun skips the videos (the same file, however named, with the same content) that already
have an ``ok`` line made with the same settings and retries the failed ones, so a run that
is killed is resumed by running the same command again. Progress goes to stderr:
a bar on a terminal, a line every ``--progress-every`` seconds otherwise, and a summary at
the end. Exit status 0 when every input has a caption, 1 when some failed, 2 for bad
arguments or an ``--out`` in use, 3 when the service stopped the run (a decoder unreachable
or full for ``--wait-down-s``, failure after failure), 130 on Ctrl-C, 143 on SIGTERM.

The server address defaults to ``$PLLAVA_SERVER`` or ``localhost:50052``; it may name several
decoders (``dns:///decoders:50052`` or ``host:50052,host:50053``), balanced round robin.
``--tls-ca`` connects over TLS (``--tls-cert``/``--tls-key`` add a client certificate), and
``--token`` (default ``$PLLAVA_TOKEN``, which keeps the token out of the process list) is
sent with every call.
"""
from __future__ import annotations

import argparse
import faulthandler
import glob
import json
import os
import signal
import sys
import threading
import time
from typing import TextIO

import grpc

from .client import DEFAULT_RETRIES, CaptionError, Client, caption_request
from .collection import (DEFAULT_WAIT_DOWN_S, CaptionFile, CollectionStopped, VideoResult, expand_inputs,
                         request_settings)
from .frames import frame_files
from .security import ClientTls, check_token

DEFAULT_SERVER = "localhost:50052"
#: Seconds between progress lines when stderr is not a terminal.
DEFAULT_PROGRESS_EVERY_S = 30.0
#: Seconds a collection run waits for a decoder that is still loading (without --timeout).
READY_TIMEOUT_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pllava-caption",
                                description="Caption a video, or a collection of videos, through PLLaVA "
                                            "decoder servers.")
    p.add_argument("inputs", nargs="*", metavar="VIDEO",
                   help="a video file (or a still image; - reads stdin); with --out also folders, glob "
                        "patterns and .txt lists of paths")
    p.add_argument("--frames", metavar="DIR",
                   help="caption frames you sampled yourself instead of a video: the .jpg/.jpeg/.png/.webp "
                        "files in DIR, in sorted name order (zero-pad the numbers), all of one size")
    p.add_argument("--server", default=os.environ.get("PLLAVA_SERVER", DEFAULT_SERVER),
                   metavar="TARGET",
                   help="decoder address, any gRPC target; several decoders as dns:///NAME:PORT or "
                        f"HOST:PORT,HOST:PORT (default: $PLLAVA_SERVER or {DEFAULT_SERVER})")
    s = p.add_argument_group("TLS and tokens")
    s.add_argument("--tls-ca", metavar="FILE",
                   help="connect over TLS, trusting this CA certificate (PEM) for the decoder's certificate")
    s.add_argument("--tls-cert", metavar="FILE",
                   help="client certificate (PEM) for decoders that require one (mutual TLS; with --tls-key)")
    s.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    s.add_argument("--token", default=os.environ.get("PLLAVA_TOKEN") or None, metavar="T",
                   help="bearer token sent with every call (default: $PLLAVA_TOKEN; the variable keeps it "
                        "out of the process list)")
    p.add_argument("--prompt", help="the question (default: the server's)")
    p.add_argument("--template", help="conversation template, e.g. recaption (default: the server's; "
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
                   help="one video: print one JSON object (as `pllava caption --json`) instead of text")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="deadline of one video's call in seconds (default: none); with --out also how long to wait "
                        f"for a decoder still loading (default {READY_TIMEOUT_S:g})")
    c = p.add_argument_group("collections")
    c.add_argument("--out", metavar="FILE.jsonl",
                   help="caption every input into this JSON-lines file, one line per video, resuming "
                        "what it already holds")
    c.add_argument("--concurrency", type=int, metavar="N",
                   help="videos in flight (default: the decoder's batch size times the decoders)")
    c.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                   help="extra tries of a video whose call failed in passing, e.g. a decoder went "
                        f"away (default {DEFAULT_RETRIES})")
    c.add_argument("--wait-down-s", type=float, default=DEFAULT_WAIT_DOWN_S, metavar="S",
                   help="how long a decoder may stay unreachable or full (its calls tried again meanwhile) "
                        f"before the run stops with exit status 3 (default {DEFAULT_WAIT_DOWN_S:g})")
    c.add_argument("--stop-after-failures", type=int, metavar="N",
                   help="stop (exit status 3) after N videos in a row failed for reasons not their own, "
                        "e.g. the decoder's encoders are down (default: twice --concurrency, at least 8; 0 = never)")
    c.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                   help="caption again the videos the file records as failed (default: yes)")
    c.add_argument("--progress-every", type=float, default=DEFAULT_PROGRESS_EVERY_S, metavar="S",
                   help="seconds between progress lines when stderr is not a terminal "
                        f"(default {DEFAULT_PROGRESS_EVERY_S:g})")
    return p


def request_kwargs(args: argparse.Namespace) -> dict:
    return dict(template=args.template, num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_frames < 0 or args.max_new_tokens < 0:
        print("error: --num-frames and --max-new-tokens cannot be negative", file=sys.stderr)
        return 2
    try:  # an option no request can carry (a negative --top-k, ...) is named before anything runs
        caption_request(prompt=args.prompt, **request_kwargs(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.frames is not None:
        return caption_frames(args)
    if not args.inputs:
        print("error: give a VIDEO to caption (or --frames DIR)", file=sys.stderr)
        return 2
    if args.out is not None:
        return caption_collection(args)
    video = args.inputs[0]
    if len(args.inputs) > 1 or os.path.isdir(video) or (not os.path.exists(video) and glob.has_magic(video)):
        print("error: several videos (a folder, a pattern or more than one file) need --out FILE.jsonl",
              file=sys.stderr)
        return 2
    return connect_and_caption(args, sys.stdin.buffer if video == "-" else video)


def caption_frames(args: argparse.Namespace) -> int:
    """``--frames DIR``: one caption of the images in DIR, sent as frames."""
    if args.inputs or args.out is not None:
        print("error: --frames DIR captions one folder of frames; it takes no VIDEO and no --out", file=sys.stderr)
        return 2
    try:
        frames = frame_files(args.frames)
    except ValueError as exc:
        print(f"error: --frames: {exc}", file=sys.stderr)
        return 2
    return connect_and_caption(args, None, frames=frames)


def connect_and_caption(args: argparse.Namespace, video, frames=None) -> int:
    """One caption through the client the flags describe (exit 2 when they cannot make one)."""
    try:
        client = make_client(args)
    except ValueError as exc:  # a malformed address list, unreadable TLS files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with client:
        return caption_one(client, video, args, frames=frames)


def make_client(args: argparse.Namespace, retry_unavailable: bool = True) -> Client:
    """The client the flags describe; ValueError naming the flag that is wrong."""
    # Checked first with the flags' names, so a message says which flag to fix.
    ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key, names=("--tls-ca", "--tls-cert", "--tls-key"))
    if args.token is not None:
        check_token(args.token, "--token (or $PLLAVA_TOKEN)")
    try:
        return Client(args.server, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                      token=args.token, timeout=args.timeout, retry_unavailable=retry_unavailable)
    except ValueError as exc:  # what is left is the address
        raise ValueError(f"--server: {exc}") from None


def caption_one(client: Client, video, args: argparse.Namespace, frames=None) -> int:
    stream = None
    try:
        stream = client.caption(video, args.prompt, frames=frames, **request_kwargs(args))
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


# ---- collections -----------------------------------------------------------------------------

def caption_collection(args: argparse.Namespace) -> int:
    """``--out``: exit 0 when every input has a caption, 1 when some videos failed, 2 for bad
    arguments or an output file that cannot be written (or that another run holds), 3 when
    the service stopped the run (the decoder unreachable or full for --wait-down-s, or
    failure after failure), 130 on Ctrl-C and 143 on SIGTERM."""
    terminated: list[int] = []

    def interrupt(signum, frame) -> None:
        """SIGTERM (docker stop, a scheduler's end of job) ends a run as Ctrl-C does: calls
        cancelled, the summary printed."""
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = (signal.signal(signal.SIGTERM, interrupt)
                if threading.current_thread() is threading.main_thread() else None)
    if hasattr(signal, "SIGUSR1"):  # a run that seems stuck: kill -USR1 PID prints where every thread is
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        code = _caption_collection(args)
    except KeyboardInterrupt:  # before the run began (waiting for the decoder, searching folders)
        print("pllava-caption: interrupted", file=sys.stderr)
        code = 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 128 + signal.SIGTERM if code == 130 and terminated else code


def _caption_collection(args: argparse.Namespace) -> int:
    if args.json or "-" in args.inputs:
        print("error: --out writes JSON lines itself; it takes neither --json nor - (stdin)", file=sys.stderr)
        return 2
    if args.concurrency is not None and args.concurrency < 1 or args.retries < 0:
        print("error: --concurrency must be at least 1 and --retries at least 0", file=sys.stderr)
        return 2
    if not args.wait_down_s >= 0 or args.stop_after_failures is not None and args.stop_after_failures < 0:
        print("error: --wait-down-s and --stop-after-failures cannot be negative", file=sys.stderr)
        return 2
    unsearchable: list[str] = []
    try:
        paths = expand_inputs(args.inputs, exclude=[args.out], unsearchable=unsearchable)
        client = make_client(args, retry_unavailable=False)  # caption_many retries itself
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for message in unsearchable:  # (lost+found at a mount's root, a colleague's private folder)
        print(f"warning: {message}; the videos in it are left out", file=sys.stderr)
    if not paths:
        print("error: no video files found in " + " ".join(args.inputs), file=sys.stderr)
        return 2
    out = CaptionFile(args.out)
    try:  # held for the whole run: a second run on the same file stops here
        out.open()
    except OSError as exc:
        client.close()
        print(f"error: --out: {exc}", file=sys.stderr)
        return 2
    with client, out:
        recorded = out.read(request_settings(args.prompt, request_kwargs(args)))
        try:
            info = client.wait_ready(READY_TIMEOUT_S if args.timeout is None else args.timeout)
            concurrency = args.concurrency or client.default_concurrency(info)
        except CaptionError as err:
            print(f"error: cannot reach the decoder at {args.server}: {err}", file=sys.stderr)
            refused = err.status in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            return 2 if refused else 3  # a token to fix, or a service to wait for
        notes = [f"{recorded.unreadable_lines} unreadable line(s) ignored"] if recorded.unreadable_lines else []
        if recorded.other_settings:
            notes.append(f"{recorded.other_settings} caption(s) made with other settings (prompt, template, "
                         "limits, sampling) do not count")
        print(f"pllava-caption: {len(paths)} video(s) -> {args.out}, {len(recorded.ok)} caption(s) with these "
              f"settings there{''.join(f'; {n}' for n in notes)}; {concurrency} at a time on "
              f"{info.model_id or 'the decoder'} at {args.server}", file=sys.stderr, flush=True)
        progress = Progress(len(paths), every=args.progress_every)
        retry_failed = args.retry_failed
        results = client.caption_many(
            paths, args.prompt, concurrency=concurrency, retries=args.retries,
            skip=lambda path, digest: recorded.skip(path, digest, retry_failed), wait_down_s=args.wait_down_s,
            max_failures_in_a_row=args.stop_after_failures, **request_kwargs(args))
        interrupted = stopped = None
        try:
            for item in results:
                if item.status != "skipped":
                    out.append(item.to_json())
                has_caption = item.status == "ok" or (
                    item.status == "skipped" and recorded.has_caption(item.path, item.sha256))
                progress.update(item, has_caption)
        except KeyboardInterrupt:
            interrupted = True
        except CollectionStopped as exc:
            stopped = str(exc)
        finally:
            results.close()
            progress.close()
    print(progress.summary(args.out, interrupted, retry_failed, stopped), file=sys.stderr, flush=True)
    if interrupted:
        return 130
    if stopped:
        return 3
    return 0 if progress.captioned == len(paths) else 1


class Progress:
    """Counts of a collection run, shown on stderr: a tqdm bar on a terminal, else a plain line
    every ``every`` seconds (from a thread, so a slow video does not hold it back)."""

    def __init__(self, total: int, stream: TextIO | None = None, every: float = DEFAULT_PROGRESS_EVERY_S):
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.ok = self.failed = self.skipped = 0
        self.captioned = 0  # inputs that have an ok line now, this run's or an earlier one
        self.tokens = 0
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._bar = None
        self._stop = threading.Event()
        self._thread = None
        if _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=self.stream, unit="video", dynamic_ncols=True,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
            self._bar.set_postfix_str(self.counts(), refresh=True)
        elif every > 0:
            self._thread = threading.Thread(target=self._tick, args=(every,), name="progress", daemon=True)
            self._thread.start()

    def update(self, item: VideoResult, has_caption: bool) -> None:
        with self._lock:
            self.captioned += has_caption
            if item.status == "ok":
                self.ok += 1
                self.tokens += item.num_generated_tokens
            elif item.status == "error":
                self.failed += 1
            else:
                self.skipped += 1
        if item.status == "error":
            self.write(f"error: {item.path}: {item.code}: {item.message}")
        if self._bar is not None:
            self._bar.set_postfix_str(self.counts(), refresh=False)
            if item.status == "skipped":  # not work done: out of the count, the rate and the ETA
                self._bar.total -= 1
                self._bar.update(0)  # redrawn at tqdm's pace: a resume of 100,000 skips drew each one
            else:
                self._bar.update(1)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def rates(self) -> tuple[float, float, float | None]:
        """(videos/min, generated tokens/s, seconds left or None) of this run."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        finished = self.ok + self.failed
        left = self.total - finished - self.skipped
        eta = left * elapsed / finished if finished else None
        return self.ok * 60 / elapsed, self.tokens / elapsed, eta

    def counts(self) -> str:
        per_min, per_s, _ = self.rates()
        return (f"{self.ok} done, {self.failed} failed, {self.skipped} skipped, "
                f"{per_min:.1f} videos/min, {per_s:.1f} tokens/s")

    def line(self) -> str:
        _, _, eta = self.rates()
        done = self.ok + self.failed + self.skipped
        return (f"pllava-caption: {done}/{self.total}: {self.counts()}, "
                f"ETA {_duration(eta) if eta is not None else '?'}")

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                text = self.line()
            self.write(text)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._bar is not None:
            self._bar.close()

    def summary(self, out: str, interrupted: bool = False, retry_failed: bool = True,
                stopped: str | None = None) -> str:
        per_min, per_s, _ = self.rates()
        head = "interrupted: " if interrupted else f"stopped: {stopped}\npllava-caption: " if stopped else ""
        text = (f"pllava-caption: {head}{self.ok} captioned, "
                f"{self.failed} failed, {self.skipped} skipped of {self.total} in "
                f"{_duration(time.monotonic() - self.start)} ({per_min:.1f} videos/min, {per_s:.1f} tokens/s); "
                f"results in {out}")
        if self.captioned < self.total:
            again = ("run the same command again to resume" if stopped else
                     "run the same command again to retry them" if retry_failed else
                     "run it again without --no-retry-failed to retry the failed ones too")
            text += f"\npllava-caption: {self.total - self.captioned} video(s) have no caption yet; {again}"
        return text


def _isatty(stream: TextIO) -> bool:
    """A terminal with a size (a pseudo-terminal of 0x0 would make tqdm print nothing)."""
    try:
        return stream.isatty() and min(os.get_terminal_size(stream.fileno())) > 0
    except (AttributeError, ValueError, OSError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


if __name__ == "__main__":
    sys.exit(main())
