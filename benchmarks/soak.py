"""Soak run: N clients captioning without pause for a set time against 2 encoders + 1 decoder.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--clients 16] [--model DIR] [--json OUT]

What it is for: leaks and drift that a short test cannot see. The servers run as processes
(``pllava_serving.launcher.launch``, what ``pllava up`` starts) with default settings except
the visual-token cache, off by default so that every caption goes to an encoder. Each client
thread loops: one caption of a sample clip (``samples/``, cycled), a random question and a
random length, greedy; ``--cancel-every K`` also cancels every K-th caption after a random
number of tokens. Every ``--sample-s`` seconds it records the resident memory of each server
process (its children, the encoders' video workers, included).

It prints one markdown table: captions done, errors by status, client-side TTFT (request sent
-> first text) and latency (request sent -> final event) p50/p99, caption throughput, each
process's RSS after warm-up, at its peak and at the end with the growth in %, and what the
servers held when they were stopped at the end (their ``held at shutdown`` log lines: KV
slots, waiting places and streams of the decoder, requests of each encoder). It exits 1 if a
caption failed or anything was still held. Not a test: ``tests/test_soak.py`` runs it for a few
seconds so that it keeps working.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench import descendants  # noqa: E402

SAMPLES = [REPO / "samples" / name for name in ("orbit.mp4", "portrait.mp4", "short.mp4", "still.jpg")]
QUESTIONS = [None, "What is happening?", "Describe the colours.", "What moves, and where?", "Is anyone there?"]
MIB = 1 << 20
HELD_DECODER = re.compile(r"held at shutdown: (\d+) of (\d+) KV slots, (\d+) requests waiting, (\d+) streams open")
HELD_ENCODER = re.compile(r"held at shutdown: (\d+) requests")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Load:
    """The client threads and what they measured."""

    def __init__(self, address: str, clients: int, max_new_tokens: tuple[int, int], cancel_every: int, seed: int):
        self.address = address
        self.clients = clients
        self.max_new_tokens = max_new_tokens
        self.cancel_every = cancel_every
        self.seed = seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done = 0
        self.cancelled = 0
        self.tokens = 0
        self.errors: Counter[str] = Counter()
        self.first_error: dict[str, str] = {}
        self.ttft_s: list[float] = []
        self.latency_s: list[float] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), name=f"client-{i}", daemon=True)
                        for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _client(self, index: int) -> None:
        from pllava_client import CaptionError, Client

        rng = random.Random(self.seed * 1000 + index)
        videos = {path: path.read_bytes() for path in SAMPLES}
        n = 0
        with Client(self.address, timeout=600) as client:
            while not self.stop.is_set():
                n += 1
                path = SAMPLES[(index + n) % len(SAMPLES)]
                cancel_after = (rng.randint(1, 8) if self.cancel_every and n % self.cancel_every == 0 else None)
                sent = time.perf_counter()
                first = None
                try:
                    stream = client.caption(videos[path], rng.choice(QUESTIONS), video_name=path.name,
                                            max_new_tokens=rng.randint(*self.max_new_tokens),
                                            request_id=f"soak-{index}-{n}")
                    with stream:
                        for _ in stream:
                            if first is None:
                                first = time.perf_counter()
                            if cancel_after is not None and len(stream.token_ids) >= cancel_after:
                                break
                    end = time.perf_counter()
                except CaptionError as err:
                    self._error(err.status.name, str(err))
                    continue
                except Exception as exc:  # noqa: BLE001 - counted and reported, the soak goes on
                    self._error(type(exc).__name__, str(exc))
                    continue
                with self.lock:
                    if cancel_after is not None and stream.result is None:
                        self.cancelled += 1
                        continue
                    self.done += 1
                    self.tokens += len(stream.token_ids)
                    self.ttft_s.append((first or end) - sent)
                    self.latency_s.append(end - sent)

    def _error(self, kind: str, text: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            self.first_error.setdefault(kind, text[:300])


def memory(servers) -> dict[str, int]:
    """RSS of each server process with its children (bytes), by server name."""
    out = {}
    for s in servers:
        pids = [s.pid] + descendants(s.pid)
        out[s.name] = sum(rss_bytes(p) for p in pids)
    return out


def held_at_shutdown(servers) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for s in servers:
        text = "\n".join(s.logs())
        if s.name == "decoder":
            m = HELD_DECODER.search(text)
            out[s.name] = ({"slots": int(m[1]), "slots_total": int(m[2]), "waiting": int(m[3]),
                            "streams": int(m[4])} if m else {"missing": True})
        else:
            m = HELD_ENCODER.search(text)
            out[s.name] = {"requests": int(m[1])} if m else {"missing": True}
    return out


def fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def table(r: dict) -> list[str]:
    lines = ["| metric | value |", "| --- | --- |"]
    add = lambda k, v: lines.append(f"| {k} | {v} |")  # noqa: E731
    add("run", f"{r['seconds'] / 60:.1f} min, {r['clients']} clients, {r['encoders']} encoders + 1 decoder")
    add("captions done", f"{r['done']} ({r['captions_per_min']:.1f}/min, {r['tokens']} tokens)")
    if r["cancelled"]:
        add("captions cancelled on purpose", str(r["cancelled"]))
    add("errors by status", ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none")
    add("TTFT p50 / p99 (s)", f"{fmt_s(r['ttft_p50_s'])} / {fmt_s(r['ttft_p99_s'])}")
    add("latency p50 / p99 (s)", f"{fmt_s(r['latency_p50_s'])} / {fmt_s(r['latency_p99_s'])}")
    for name, m in r["memory"].items():
        add(f"RSS {name} (MiB): after warm-up → peak → end",
            f"{m['first'] / MIB:.0f} → {m['peak'] / MIB:.0f} → {m['last'] / MIB:.0f} ({m['growth_pct']:+.1f} %)")
    for name, h in r["held"].items():
        if h.get("missing"):
            add(f"held at the end, {name}", "no 'held at shutdown' line")
        elif name == "decoder":
            add("held at the end, decoder", f"{h['slots']} of {h['slots_total']} KV slots, {h['waiting']} waiting, "
                                            f"{h['streams']} streams")
        else:
            add(f"held at the end, {name}", f"{h['requests']} requests")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="PLLaVA serving soak run (not a test)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default 10)")
    p.add_argument("--seconds", type=float, help="the same in seconds (overrides --minutes)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--encoders", type=int, default=2, help="encoder servers (default 2)")
    p.add_argument("--model", metavar="DIR", help="checkpoint (default: the tiny one pllava up uses)")
    p.add_argument("--max-new-tokens", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"),
                   help="each caption's length, drawn in this range (default 16 64)")
    p.add_argument("--cancel-every", type=int, default=0, metavar="K",
                   help="cancel every K-th caption of a client after 1-8 tokens (default 0: never)")
    p.add_argument("--visual-cache-bytes", type=int, default=0,
                   help="the decoder's visual-token cache (default 0: every caption is encoded)")
    p.add_argument("--sample-s", type=float, default=30.0, help="seconds between memory samples (default 30)")
    p.add_argument("--decoder-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="any other decoder setting (see pllava-decoder --help); repeatable")
    p.add_argument("--encoder-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="any encoder setting (see pllava-encoder --help); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seeds the questions, lengths and cancels (default 0)")
    p.add_argument("--json", metavar="OUT", help="write every number here, memory samples included")
    args = p.parse_args(argv)

    from pllava_serving.launcher import ensure_tiny_model, launch, parse_setting

    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    model = Path(args.model) if args.model else ensure_tiny_model()
    decoder_settings = {"visual_cache_bytes": args.visual_cache_bytes,
                        **dict(parse_setting(s) for s in args.decoder_setting)}
    encoder_settings = dict(parse_setting(s) for s in args.encoder_setting)
    log(f"starting {args.encoders} encoders + 1 decoder on {model}")
    cluster = launch(model, encoders=args.encoders, port=0, echo=None, decoder_settings=decoder_settings,
                     encoder_settings=encoder_settings)
    servers = cluster.servers
    samples: list[dict] = []
    try:
        load = Load(cluster.address, args.clients, tuple(args.max_new_tokens), args.cancel_every, args.seed)
        log(f"warm-up: one caption per client at {cluster.address}")
        warm = Load(cluster.address, args.clients, (4, 4), 0, args.seed + 1)
        warm.start()
        warm_deadline = time.monotonic() + 600
        while warm.done + sum(warm.errors.values()) < args.clients and time.monotonic() < warm_deadline:
            time.sleep(0.1)
        warm.join(120)
        log(f"soaking for {seconds:.0f} s with {args.clients} clients")
        start = time.monotonic()
        samples.append({"t_s": 0.0, **memory(servers)})
        load.start()
        next_sample = start + args.sample_s
        while (now := time.monotonic()) < start + seconds:
            time.sleep(max(0.0, min(next_sample, start + seconds) - now))
            if time.monotonic() >= next_sample:
                samples.append({"t_s": time.monotonic() - start, **memory(servers)})
                next_sample += args.sample_s
                log(f"{samples[-1]['t_s']:.0f} s: {load.done} captions, {sum(load.errors.values())} errors; RSS "
                    + ", ".join(f"{s.name} {samples[-1][s.name] / MIB:.0f} MiB" for s in servers))
        load.join(600)
        elapsed = time.monotonic() - start
        samples.append({"t_s": elapsed, **memory(servers)})
    finally:
        cluster.stop()
    held = held_at_shutdown(servers)

    mem = {}
    for s in servers:
        values = [row[s.name] for row in samples]
        mem[s.name] = {"first": values[0], "peak": max(values), "last": values[-1],
                       "growth_pct": 100.0 * (values[-1] - values[0]) / values[0] if values[0] else 0.0}
    result = {
        "seconds": elapsed, "clients": args.clients, "encoders": args.encoders, "model": str(model),
        "max_new_tokens": list(args.max_new_tokens), "cancel_every": args.cancel_every,
        "visual_cache_bytes": args.visual_cache_bytes, "done": load.done, "cancelled": load.cancelled,
        "tokens": load.tokens, "captions_per_min": load.done / elapsed * 60, "errors": dict(load.errors),
        "first_error": load.first_error,
        "ttft_p50_s": percentile(load.ttft_s, 50), "ttft_p99_s": percentile(load.ttft_s, 99),
        "latency_p50_s": percentile(load.latency_s, 50), "latency_p99_s": percentile(load.latency_s, 99),
        "memory": mem, "memory_samples": samples, "held": held,
        "machine": {"cores": os.cpu_count(), "arch": platform.machine(), "load_average": os.getloadavg()},
    }
    lines = table(result)
    print("\n".join(lines), flush=True)
    for kind, text in load.first_error.items():
        log(f"first {kind}: {text}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    leaked = any(h.get("missing") or any(v for k, v in h.items() if k != "slots_total") for h in held.values())
    return 1 if load.errors or leaked or not load.done else 0


if __name__ == "__main__":
    sys.exit(main())
