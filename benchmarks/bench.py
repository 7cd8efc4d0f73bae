"""PLLaVA serving benchmark: this project against HuggingFace transformers on the same weights.

    .venv/bin/python benchmarks/bench.py [--quick] [--json OUT] [--model DIR] [--sections ...]

One run on one machine (issue 6, "The benchmark"):

1. a serving-scale random checkpoint in the real llava-hf layout (``pllava.tiny.make_tiny(...,
   preset="serving")``: CLIP 512x8 at 336 px, 16 frames pooled to 16x12x12, LLaMA 1024 wide,
   12 layers, 16 heads, vocab 32064), written once under ~/.cache/pllava/bench-serving-16f;
2. 8 different short test clips (``media.py``), and for every request through the servers a
   byte-distinct copy of a clip, so the decoder's visual-token cache never hits;
3. the sections (``--sections`` picks some):

   engine       in process: time to first token (TTFT) at batch 1 for a ~300-position prompt
                (2 frames = 288 visual tokens + text), decode tokens/s of 1 stream and of 8
                concurrent streams (128 greedy tokens each) with the server's default cache
                (8 slots x 4096) and with the cache sized to the load (8 x 512); transformers:
                TTFT, batch 1 and a static batch of 8 of the same prompt. Greedy tokens compared.
   admission    7 streams decoding, then a 16-frame request is admitted: the longest gap between
                two tokens of a running stream during the admission, against the steady step
                before it (and, to tell a host that slowed meanwhile, the step after it); then
                the same beside a lone stream, whose step hides the least of a chunk.
   memory       peak RSS of a 16-frame caption (32 tokens) in a subprocess: ``pllava caption``
                against transformers (``hf_caption.py``), with the budget terms of issue 6.
   servers      2 encoders + 1 decoder (default settings) as processes, warm-up time, a compile
                probe (first request at a prompt length not seen before vs a repeat), then 1, 4,
                8 and 16 concurrent clients (4 frames) and 8 clients at 16 frames, 128 tokens:
                TTFT p50/max, aggregate decode tok/s, end-to-end tok/s, videos/min; peak RSS of
                every server process.
   sequential   transformers one video at a time over the same 8 videos at 4 and 16 frames
                (the baseline of the servers' rows; its tokens are compared with the servers').

It prints one markdown table (stdout), progress on stderr, and writes every raw number to
``--json``. ``--quick`` runs every section on a tiny checkpoint with a few tokens, 2 videos and
1-2 clients, and exits non-zero unless every section ran and every token comparison agreed.
Timing is never asserted; the full run also exits non-zero if a section failed or tokens differ.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import media  # noqa: E402

SECTIONS = ("engine", "admission", "memory", "servers", "sequential")
GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the default run, or ``--quick``."""

    preset: str = "serving"
    videos: int = 8
    new_tokens: int = 128  # per stream, greedy
    batch: int = 8  # concurrent streams in process (= the server's default max_batch)
    default_context: int = 4096  # the decoder's default max_context for this checkpoint
    sized_context: int = 512  # a cache sized to a ~300-position prompt + 128 tokens
    prompt_frames: int = 2  # the engine section's prompt: 2 frames = 288 visual tokens
    prompt_question: str = "Describe."
    prompt_template: str = "simple"
    small_frames: int = 4  # the servers' runs
    large_frames: int = 16  # PLLaVA's own setting
    probe_frames: int = 8  # a prompt length no one has asked for yet
    clients: tuple[int, ...] = (1, 4, 8, 16)
    large_clients: int = 8  # clients of the large-frames server run
    memory_tokens: int = 32
    ttft_repeats: int = 5
    batch_repeats: int = 4  # in-process 1- and 8-stream runs per cache, interleaved (the fastest one is reported)
    hf_repeats: int = 2  # transformers' 1- and 8-stream runs (the fastest one is reported)
    steady_steps: int = 16  # decode steps of 7 streams timed before an admission (their median: the step), and after
    admissions: int = 1  # 16-frame admissions in a row (--admissions): the first is the table's, all show the spread
    lone_admissions: int = 1  # then the same beside one stream (the lightest step: a chunk's share of a wait is largest)
    encoders: int = 2


DEFAULT = Plan()
QUICK = Plan(preset="tiny", videos=2, new_tokens=8, prompt_frames=1, small_frames=2, large_frames=4,
             probe_frames=3, clients=(1, 2), large_clients=2, memory_tokens=8, ttft_repeats=2,
             steady_steps=3, hf_repeats=1)


# ----------------------------------------------------------------------------- helpers

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pllava"


def ensure_checkpoint(path: Path, preset: str, num_frames: int) -> Path:
    """The random checkpoint at ``path``, written (to a sibling, then renamed) if absent."""
    if (path / "config.json").exists():
        return path
    from pllava.tiny import make_tiny

    log(f"writing a {preset} random checkpoint to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        make_tiny(tmp, seed=0, num_frames=num_frames, preset=preset)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def machine() -> dict:
    info = {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    try:
        import mindspore
        import torch
        import transformers

        info.update(mindspore=mindspore.__version__, torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length when one is a prefix), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Pairwise token comparison: all equal?, how many pairs equal, the first mismatch."""
    mismatches = [first_mismatch(a, b) for a, b in zip(ours, theirs)]
    bad = [(i, m) for i, m in enumerate(mismatches) if m is not None]
    return {"agree": not bad and len(ours) == len(theirs), "equal": len(ours) - len(bad), "pairs": len(ours),
            "first_mismatch": None if not bad else {"pair": bad[0][0], "index": bad[0][1]}}


def vm_hwm(pid: int) -> int | None:
    """Peak resident set (bytes) of a live process, from /proc/PID/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def run_measured(argv: list[str], timeout: float) -> dict:
    """Run ``argv`` under ``peak_rss.py``: its wall time, exit status, output and peak RSS
    (the command's own ``ru_maxrss``, not inflated by this big process's memory at the fork)."""
    with tempfile.TemporaryDirectory(prefix="pllava-bench-rss-") as tmp:
        report = Path(tmp) / "rss.json"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / "peak_rss.py"), str(report), "--", *argv],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - start
        measured = json.loads(report.read_text()) if report.exists() else {"returncode": proc.returncode,
                                                                            "peak_rss_bytes": None}
    return {"argv": argv, "returncode": measured["returncode"], "wall_s": wall,
            "peak_rss_bytes": measured["peak_rss_bytes"], "stdout": proc.stdout, "stderr": proc.stderr}


def console_script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


# ----------------------------------------------------------------------------- the bench

class Bench:
    def __init__(self, plan: Plan, model_dir: Path, videos: list[Path]):
        self.plan = plan
        self.model_dir = model_dir
        self.videos = videos
        self.results: dict = {}
        self._hf = None
        self._backend = None
        self._default_language = None
        self._held_weights: dict | None = None
        self.language_info: dict[int, dict] = {}
        from pllava.config import PllavaConfig, PreprocessorConfig
        from pllava.tokenizer import Tokenizer

        self.cfg = PllavaConfig.from_pretrained(model_dir)
        self.preprocessor = PreprocessorConfig.from_pretrained(model_dir)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)

    # ---- shared pieces ------------------------------------------------------------------------
    @property
    def backend(self):
        if self._backend is None:
            from pllava.runtime import setup_backend

            self._backend = setup_backend("CPU")
        return self._backend

    @property
    def hf(self):
        if self._hf is None:
            import hf_pllava

            t = time.perf_counter()
            self._hf = hf_pllava.load(self.model_dir)
            log(f"transformers model loaded in {time.perf_counter() - t:.1f} s")
        return self._hf

    def language(self, max_len: int):
        """A PllavaLanguage with ``plan.batch`` slots of ``max_len``, every graph compiled."""
        from pllava.model import PllavaLanguage

        t = time.perf_counter()
        lang = PllavaLanguage.from_pretrained(self.model_dir, self.cfg, self.backend,
                                              num_slots=self.plan.batch, max_len=max_len)
        loaded = time.perf_counter()
        graphs = lang.warm_up()
        info = self.language_info[max_len] = {"load_s": loaded - t, "warm_up_s": time.perf_counter() - loaded,
                                               "graphs": graphs, "num_slots": self.plan.batch, "max_len": max_len}
        log(f"engine {self.plan.batch} x {max_len}: loaded in {loaded - t:.1f} s, {graphs} graphs "
            f"compiled in {info['warm_up_s']:.1f} s")
        return lang

    def default_language(self):
        if self._default_language is None:
            self._default_language = self.language(self.plan.default_context)
        return self._default_language

    def held_weight_bytes(self) -> dict:
        """Bytes of each half's weights as this project's modules hold them (a projection the
        checkpoint stores in half precision stays so on the CPU): the budgets' weight terms."""
        if self._held_weights is None:
            from pllava.model import PllavaLanguage, PllavaVision

            vision = PllavaVision.from_pretrained(self.model_dir, self.cfg, self.backend)
            language = PllavaLanguage.from_pretrained(self.model_dir, self.cfg, self.backend, num_slots=1,
                                                      max_len=self.plan.sized_context)
            self._held_weights = {"vision": parameter_bytes(vision), "language": parameter_bytes(language.lm)}
            del vision, language
            release_dropped()
        return self._held_weights

    def drop_default_language(self) -> None:
        self._default_language = None
        release_dropped()

    def short_prompt(self):
        """The engine section's prompt: ids, our visual tokens and transformers' (2 frames)."""
        if not hasattr(self, "_short"):
            import hf_pllava as H
            from pllava.model import PllavaVision
            from pllava.prompt import build_prompt
            from pllava.video import load_frames, preprocess

            cfg = self.cfg.with_frames(self.plan.prompt_frames)
            pixels = preprocess(load_frames(self.videos[0], cfg.num_frames).frames, self.preprocessor)
            vision = PllavaVision.from_pretrained(self.model_dir, cfg, self.backend)
            ours = vision.encode_videos([pixels])[0]
            del vision
            theirs = H.visual_tokens(self.hf, pixels, cfg.num_frames, cfg.pooling_shape).numpy()
            ids = self.tokenizer.encode(build_prompt(self.plan.prompt_question, self.plan.prompt_template))
            self._short = (ids, ours, theirs)
        return self._short

    def request(self, ids, visual, max_new_tokens: int):
        from pllava.generation import Request
        from pllava.sampling import SamplingParams

        return Request(list(ids), visual, SamplingParams(max_new_tokens=max_new_tokens))


def release_dropped() -> None:
    """Free what was dropped: :func:`drive` froze the heap (as the servers do), and a frozen
    object in a reference cycle is never collected until unfrozen."""
    gc.unfreeze()
    gc.collect()


def drive(engine, requests, until=None) -> dict:
    """Add ``requests`` and step the engine until it is idle (or ``until(state)`` says stop).
    Every token gets the time its step returned."""
    from pllava_serving.server import freeze_startup_heap

    freeze_startup_heap()  # as the servers do once warmed up: no full collection of this heap mid-run
    state = {"added": time.perf_counter(), "tokens": {r.request_id: [] for r in requests},
             "times": {r.request_id: [] for r in requests}, "finish": {}, "steps": [], "ran": []}
    for r in requests:
        engine.add(r)
    while engine.has_work():
        s = time.perf_counter()
        events = engine.step()
        e = time.perf_counter()
        n = 0
        for ev in events:
            if ev.token_id is not None:
                state["tokens"].setdefault(ev.request_id, []).append(ev.token_id)
                state["times"].setdefault(ev.request_id, []).append(e)
                n += 1
            if ev.finish_reason is not None:
                state["finish"][ev.request_id] = ev.finish_reason.value
        state["steps"].append((s, e, n))
        ran = engine.last_step
        state["ran"].append((ran.prefill_tokens, ran.decode_batch, ran.prefill_part))  # what each step ran, for diagnosis
        if until is not None and until(state):
            break
    return state


# ----------------------------------------------------------------------------- a. engine

def section_engine(b: Bench) -> dict:
    import hf_pllava as H
    from pllava import cpu_kernels
    from pllava.generation import Engine

    p = b.plan
    ids, ours_visual, hf_visual = b.short_prompt()
    positions = len(ids) - 1 + len(ours_visual)
    log(f"engine: prompt of {positions} positions ({len(ids)} text ids with one <image>, "
        f"{len(ours_visual)} visual tokens from {p.prompt_frames} frame(s))")
    out: dict = {"prompt_positions": positions, "text_ids": len(ids), "visual_tokens": len(ours_visual)}

    # transformers first: its tokens are the reference
    hf = b.hf
    eos = b.tokenizer.eos_token_id

    def hf_ttft() -> float:
        t = time.perf_counter()
        H.greedy(hf, H.embeddings(hf, ids, hf_visual), 1, eos)
        return time.perf_counter() - t

    first_ttft = [hf_ttft() for _ in range(p.ttft_repeats)]  # again below, side by side with ours
    # Its fastest of hf_repeats runs each, as ours is its fastest of batch_repeats.
    ones, batches = [], []
    for _ in range(p.hf_repeats):
        ones.append(H.greedy(hf, H.embeddings(hf, ids, hf_visual), p.new_tokens, eos))
        t = time.perf_counter()
        batches.append((H.greedy(hf, H.embeddings(hf, ids, hf_visual).expand(p.batch, -1, -1).contiguous(),
                                 p.new_tokens, eos), time.perf_counter() - t))
    one = min(ones, key=lambda run: run.decode_s / max(1, run.decode_tokens))
    batch, batch_total = min(batches, key=lambda run: run[0].decode_s / max(1, run[0].decode_tokens))
    out["transformers"] = {
        "ttft_first_s": first_ttft,
        "batch1": {"tokens": one.tokens[0], "prefill_s": one.prefill_s, "decode_s": one.decode_s,
                   "decode_tok_s": one.decode_tokens / one.decode_s if one.decode_s else 0.0},
        "batch": {"size": p.batch, "prefill_s": batch.prefill_s, "decode_s": batch.decode_s,
                  "decode_tok_s": batch.decode_tokens / batch.decode_s if batch.decode_s else 0.0,
                  "end_to_end_tok_s": sum(map(len, batch.tokens)) / batch_total,
                  "rows_equal_batch1": all(r == one.tokens[0] for r in batch.tokens)},
        "runs": p.hf_repeats,
    }
    log(f"engine: transformers TTFT {statistics.median(first_ttft):.3f} s, decode "
        f"{out['transformers']['batch1']['decode_tok_s']:.1f} tok/s (1), "
        f"{out['transformers']['batch']['decode_tok_s']:.1f} tok/s ({p.batch})")
    reference = one.tokens[0]

    # Both caches loaded at once and their runs interleaved: the ratio between them is
    # measured side by side (one after the other, minutes apart, it drifted 0.82-0.98x on a
    # shared host). The 8-stream run goes four times each, in alternating order, the fastest
    # kept: a run is ~3 s, and with two the default/sized ratio read 0.84-0.99x over two
    # full runs of one commit where 60-step medians side by side gave 0.95-0.97x.
    # The default loads first, as the one model a server loads: a model loaded after another
    # ran at most as fast (8 streams, 512 loaded first: 262-287 tok/s vs 217-278 at 1024-4096
    # loaded after it; 4096 first: 279-281 vs 273-298 at 512, alike).
    caches = {"default": p.default_context, "sized": p.sized_context}
    engines = {}
    for name, max_len in caches.items():
        if max_len < positions + p.new_tokens + 1:
            raise ValueError(f"the {name} cache ({max_len}) cannot hold {positions} + {p.new_tokens} tokens")
        engines[name] = Engine(b.default_language() if name == "default" else b.language(max_len), b.tokenizer)
    # transformers' TTFT again, between ours: the ratio side by side (measured minutes apart,
    # on a contended day, ours read 0.90x where within one process it swung 0.39-0.69 s
    # from one stretch of seconds to the next)
    ttft = {name: [] for name in caches}
    side_by_side, tile_ns = [], []
    for _ in range(p.ttft_repeats):
        tile_ns.append(cpu_kernels.tile_product_ns())  # the host's share of the tiles, which our prefill follows
        for name, engine in engines.items():
            req = b.request(ids, ours_visual, 1)
            st = drive(engine, [req])
            ttft[name].append(st["times"][req.request_id][0] - st["added"])
        side_by_side.append(hf_ttft())
    out["transformers"].update(ttft_s=statistics.median(side_by_side), ttft_all_s=side_by_side)
    if None not in tile_ns:
        out["tile_product_ns"] = tile_ns
    log(f"engine: TTFT side by side, median of {p.ttft_repeats}: transformers {out['transformers']['ttft_s']:.3f} s, "
        + ", ".join(f"{name} {statistics.median(t):.3f} s" for name, t in ttft.items())
        + (f"; AMX tile product {min(tile_ns):.1f}-{max(tile_ns):.1f} ns" if "tile_product_ns" in out else ""))
    # One stream goes as often as 8 do, alternating, the fastest kept (one run each read the
    # default at 0.90x the sized cache where the 8-stream runs read 1.00x).
    single = {name: [] for name in caches}
    for repeat in range(p.batch_repeats):
        for name in (list(caches) if repeat % 2 == 0 else list(reversed(caches))):
            req = b.request(ids, ours_visual, p.new_tokens)
            st = drive(engines[name], [req])
            single[name].append((st["times"][req.request_id], st["tokens"][req.request_id]))
    # One unmeasured 8-stream run each first: a cache's first run writes slots and positions
    # no request has yet (fresh pages), and ran slower than its later runs (median step 26.0
    # and 22.4 ms against ~20 in a run where the default cache's went first).
    for engine in engines.values():
        batch_run(b, engine, ids, ours_visual)
    batches = {name: [] for name in caches}
    for repeat in range(p.batch_repeats):
        for name in (list(caches) if repeat % 2 == 0 else list(reversed(caches))):
            batches[name].append(batch_run(b, engines[name], ids, ours_visual))
    for name, max_len in caches.items():
        rates = [(len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0 for t, _ in single[name]]
        decode1 = max(rates)
        tokens = single[name][rates.index(decode1)][1]
        # each run's median time between two tokens: one run's rate swayed the ratio by a tenth
        medians1 = [statistics.median(b_ - a_ for a_, b_ in zip(t, t[1:])) for t, _ in single[name] if len(t) > 1]
        best = max(batches[name], key=lambda r: r["decode_tok_s"])
        rows = [row for r in batches[name] for row in r.pop("rows")]
        best["decode_tok_s_all"] = [r["decode_tok_s"] for r in batches[name]]
        medians = [r["median_step_s"] for r in batches[name] if r["median_step_s"] is not None]
        best["median_step_s_all"] = medians
        best["median_step_s"] = statistics.median(medians) if medians else None
        out[name] = {
            **b.language_info[max_len], "ttft_s": statistics.median(ttft[name]), "ttft_all_s": ttft[name],
            "batch1": {"tokens": tokens, "decode_tok_s": decode1, "decode_tok_s_all": rates,
                       "median_step_s": statistics.median(medians1) if medians1 else None,
                       "median_step_s_all": medians1},
            "batch": best,
            "agree_batch1": agreement([t for _, t in single[name]], [reference] * len(single[name])),
            "agree_batch": agreement(rows, [reference] * len(rows)),
        }
        log(f"engine {name} ({p.batch} x {max_len}): TTFT {out[name]['ttft_s']:.3f} s, decode {decode1:.1f} tok/s (1), "
            f"{best['decode_tok_s']:.1f} tok/s ({p.batch} streams; runs {', '.join(f'{x:.1f}' for x in best['decode_tok_s_all'])}), "
            f"tokens agree: {out[name]['agree_batch1']['agree'] and out[name]['agree_batch']['agree']}")
    del engines
    release_dropped()
    out["agree"] = all(out[n]["agree_batch1"]["agree"] and out[n]["agree_batch"]["agree"] for n in ("sized", "default"))
    return out


def batch_run(b: Bench, engine, ids, visual) -> dict:
    """``plan.batch`` streams of the same prompt started together: decode tok/s while all of
    them decode, end-to-end tok/s, and their tokens (``rows``)."""
    p = b.plan
    reqs = [b.request(ids, visual, p.new_tokens) for _ in range(p.batch)]
    st = drive(engine, reqs)
    rows = [st["tokens"][r.request_id] for r in reqs]
    firsts = [st["times"][r.request_id][0] for r in reqs]
    lasts = [st["times"][r.request_id][-1] for r in reqs]
    all_in, first_out = max(firsts), min(lasts)
    window = "all streams decoding"
    if first_out <= all_in:  # too few tokens for all to run at once (--quick): every token after a first
        window, all_in, first_out = "after the first token", min(firsts), max(lasts)
    in_window = sum(1 for r in reqs for x in st["times"][r.request_id] if all_in < x <= first_out)
    steps = [end - start for start, end, _ in st["steps"] if all_in < end <= first_out]
    return {"size": p.batch, "decode_tok_s": in_window / (first_out - all_in) if first_out > all_in else 0.0,
            "median_step_s": statistics.median(steps) if steps else None,
            "steady_window": window, "steady_window_s": first_out - all_in, "steady_window_tokens": in_window,
            "end_to_end_tok_s": sum(map(len, rows)) / (max(lasts) - st["added"]), "wall_s": max(lasts) - st["added"],
            "rows": rows}


# ----------------------------------------------------------------------------- b. admission

def section_admission(b: Bench) -> dict:
    """``plan.admissions`` admissions of a long prompt beside running streams, each into a
    fresh engine over the default language: the first one's numbers (a server's first such
    admission: no chunk has run beside decode rows past the short prompts' context yet), and
    each one's longest wait in ``admissions``; the later ones run over the chunk times the
    earlier ones measured, as a server's later admissions do. Then ``plan.lone_admissions``
    such admissions beside one stream (in ``lone_stream``)."""
    runs = []
    for n in range(b.plan.admissions):
        if b.plan.admissions > 1:
            log(f"admission {n + 1} of {b.plan.admissions}")
        runs.append(one_admission(b))
    out = runs[0]
    out["admissions"] = [admission_summary(r) for r in runs]
    out["lone_stream"] = [admission_summary(one_admission(b, running=1)) for _ in range(b.plan.lone_admissions)]
    return out


def admission_summary(run: dict) -> dict:
    """What the JSON keeps of each admission of a series: its longest wait and how it ran."""
    return ({k: run[k] for k in ("running_streams", "gap_over_step", "gap_over_step_after", "max_gap_s", "steady_step_s",
                                 "admission_steps", "admission_ttft_s", "chunks_fed")}
            | {"slowest_steps": run["slowest_steps"][:3]})


def one_admission(b: Bench, running: int | None = None) -> dict:
    """A long prompt admitted beside ``running`` streams decoding (default: every other slot)."""
    import numpy as np

    from pllava.generation import Engine
    from pllava.prompt import DEFAULT_QUESTION, DEFAULT_TEMPLATE, build_prompt

    p = b.plan
    ids, visual, _ = b.short_prompt()
    lang = b.default_language()
    engine = Engine(lang, b.tokenizer)
    running = p.batch - 1 if running is None else running
    long_ids = b.tokenizer.encode(build_prompt(DEFAULT_QUESTION, DEFAULT_TEMPLATE))
    big_cfg = b.cfg.with_frames(p.large_frames)
    # The admitted prompt's values do not change its cost: random visual tokens at the scale of real ones.
    rng = np.random.default_rng(0)
    big_visual = (rng.standard_normal((big_cfg.num_visual_tokens, visual.shape[1])) * visual.std()).astype(np.float32)
    big_positions = len(long_ids) - 1 + len(big_visual)
    budget = lang.max_len - (len(ids) - 1 + len(visual)) - 2
    streams = [b.request(ids, visual, budget) for _ in range(running)]
    new = b.request(long_ids, big_visual, 2)
    plural = "" if running == 1 else "s"
    log(f"admission: {running} stream{plural} decoding, then a {p.large_frames}-frame request of {big_positions} positions")
    phase = {"name": "start", "steady_from": 0, "added_at": None, "stop_after": None}

    def until(state):
        times = state["times"]
        if phase["name"] == "start" and all(times[r.request_id] for r in streams):
            phase.update(name="steady", steady_from=len(state["steps"]))
        elif phase["name"] == "steady" and len(state["steps"]) - phase["steady_from"] >= p.steady_steps:
            phase.update(name="admitting", added_at=time.perf_counter(), steady_to=len(state["steps"]))
            state["tokens"][new.request_id], state["times"][new.request_id] = [], []
            engine.add(new)
        elif phase["name"] == "admitting" and times.get(new.request_id):
            # the admitted request's second token, then the steady steps again
            phase.update(name="after", after_from=len(state["steps"]) + 1,
                         stop_after=len(state["steps"]) + 1 + p.steady_steps)
        elif phase["name"] == "after" and len(state["steps"]) >= phase["stop_after"]:
            return True
        return False

    st = drive(engine, streams, until)
    for r in streams + [new]:
        engine.cancel(r.request_id)
    while engine.has_work():
        engine.step()
    if phase["added_at"] is None or not st["times"].get(new.request_id):
        raise RuntimeError(f"the admission did not complete (phase {phase['name']}; streams finished: {st['finish']})")
    steady = [e - s for s, e, _ in st["steps"][phase["steady_from"]:phase["steady_to"]]]
    added, admitted = phase["added_at"], st["times"][new.request_id][0]
    gaps = []
    for r in streams:
        times = st["times"][r.request_id]
        before = [x for x in times if x <= added][-1:]
        during = [x for x in times if added < x <= admitted]
        after = [x for x in times if x > admitted][:1]
        seq = before + during + after
        gaps += [b_ - a_ for a_, b_ in zip(seq, seq[1:])]
    steady_step = statistics.median(steady)
    # The same steps after the admission: a host that slowed during it shows here too (the
    # target compares against the step before).
    after = [e - s for s, e, _ in st["steps"][phase["after_from"]:phase["stop_after"]]]
    after_step = statistics.median(after)
    max_gap = max(gaps) if gaps else float("nan")
    out = {"running_streams": running, "admitted_positions": big_positions, "admitted_frames": p.large_frames,
           "steady_step_s": steady_step, "steady_steps_s": steady, "max_gap_s": max_gap,
           "gap_over_step": max_gap / steady_step, "steady_after_step_s": after_step,
           "steady_after_steps_s": after, "gap_over_step_after": max_gap / after_step,
           "admission_ttft_s": admitted - added,
           "admission_steps": sum(1 for _, e, _ in st["steps"] if added < e <= admitted),
           "gaps_s": sorted(gaps, reverse=True)[:20],
           "slowest_steps": slowest_steps(st, added, admitted),
           "chunks_fed": chunks_fed(st, added, admitted),
           "streams_finished_early": {k: v for k, v in st["finish"].items() if k != new.request_id}}
    log(f"admission: steady step {steady_step * 1e3:.0f} ms ({out['steady_after_step_s'] * 1e3:.0f} after), "
        f"longest gap {max_gap * 1e3:.0f} ms ({out['gap_over_step']:.1f}x), "
        f"admitted in {out['admission_steps']} steps, {out['admission_ttft_s']:.1f} s")
    return out


def slowest_steps(state: dict, start: float, end: float, n: int = 10) -> list[dict]:
    """The ``n`` longest engine steps that ended in (start, end]: seconds, the prompt positions
    the step fed, the streams it decoded and which part of a chunk run in parts it ran, if one
    (what a long inter-token gap was made of)."""
    steps = [{"seconds": e - s, "prefill_tokens": fed, "decode_rows": rows, "chunk_part": part}
             for (s, e, _), (fed, rows, part) in zip(state["steps"], state["ran"]) if start < e <= end]
    return sorted(steps, key=lambda step: -step["seconds"])[:n]


def chunks_fed(state: dict, start: float, end: float) -> dict:
    """How the steps that ended in (start, end] fed the prompt: a count per chunk length, whole
    or "in parts" (those counted at the part that completed them), and the steps of parts."""
    fed: dict = {}
    for (_, e, _), (tokens, _, part) in zip(state["steps"], state["ran"]):
        if not start < e <= end:
            continue
        if tokens:
            key = f"{tokens} in parts" if part else str(tokens)
            fed[key] = fed.get(key, 0) + 1
        if part:
            fed["steps of parts"] = fed.get("steps of parts", 0) + 1
    return fed


# ----------------------------------------------------------------------------- c. memory

def parameter_bytes(cell) -> int:
    """Bytes of ``cell``'s weights as it holds them (half precision where it keeps a projection
    so), its KV cache left out."""
    return sum(p.nbytes for name, p in cell.parameters_and_names() if "_cache." not in name)


def kv_bytes(cfg, slots: int, max_len: int) -> int:
    t = cfg.text
    head_dim = t.hidden_size // t.num_attention_heads
    return t.num_hidden_layers * 2 * slots * max_len * t.num_key_value_heads * head_dim * 4


def section_memory(b: Bench) -> dict:
    p = b.plan
    video = str(b.videos[0])
    weights = b.held_weight_bytes()
    kv = kv_bytes(b.cfg, 1, b.cfg.text.max_position_embeddings)  # the Captioner's cache: 1 slot, the model's context
    common = [video, "--model", str(b.model_dir), "--num-frames", str(p.large_frames),
              "--max-new-tokens", str(p.memory_tokens)]
    log(f"memory: pllava caption, {p.large_frames} frames, {p.memory_tokens} tokens, in a subprocess")
    ours = run_measured([console_script("pllava"), "caption", *common, "--json"], timeout=900)
    log("memory: transformers, the same, in a subprocess")
    theirs = run_measured([sys.executable, str(HERE / "hf_caption.py"), *common], timeout=900)
    for name, run in (("pllava caption", ours), ("hf_caption.py", theirs)):
        if run["returncode"] != 0:
            raise RuntimeError(f"{name} exited with {run['returncode']}:\n{run['stderr'][-3000:]}")
    ours_json = json.loads(ours["stdout"].strip().splitlines()[-1])
    theirs_json = json.loads(theirs["stdout"].strip().splitlines()[-1])
    budget = weights["vision"] + weights["language"] + kv + int(1.5 * GIB)
    out = {
        "frames": p.large_frames, "new_tokens": p.memory_tokens,
        "prompt_positions": len(ours_json["prompt_token_ids"]) - 1 + ours_json["num_visual_tokens"],
        "weights_bytes": weights, "kv_bytes": kv, "kv_shape": {"slots": 1, "max_len": b.cfg.text.max_position_embeddings},
        "budget_bytes": budget,
        "ours": {"peak_rss_bytes": ours["peak_rss_bytes"], "wall_s": ours["wall_s"], "timings": ours_json["timings"],
                 "tokens": ours_json["token_ids"]},
        "transformers": {"peak_rss_bytes": theirs["peak_rss_bytes"], "wall_s": theirs["wall_s"],
                         "timings": theirs_json["timings"], "tokens": theirs_json["token_ids"]},
        "agree": agreement([ours_json["token_ids"]], [theirs_json["token_ids"]]),
    }
    log(f"memory: peak RSS ours {ours['peak_rss_bytes'] / GIB:.2f} GiB (budget {budget / GIB:.2f}), "
        f"transformers {theirs['peak_rss_bytes'] / GIB:.2f} GiB; tokens agree: {out['agree']['agree']}")
    return out


# ----------------------------------------------------------------------------- d. servers

class Servers:
    """``encoders`` encoders + 1 decoder as processes on 127.0.0.1 with default settings (what
    ``pllava up --encoders N`` starts), timed from process start to health SERVING."""

    def __init__(self, model_dir: Path, encoders: int):
        from pllava_serving.launcher import ServerProcess, server_command

        self.started: dict[str, float] = {}
        self.serving: dict[str, float] = {}
        self.encoders, self.decoder = [], None
        common = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0"]
        for i in range(encoders):
            self.started[f"encoder-{i}"] = time.perf_counter()
            self.encoders.append(ServerProcess(f"encoder-{i}", server_command("pllava-encoder") + common, echo=None))
        target = "ipv4:" + ",".join(e.wait_bound(300) for e in self.encoders)
        self.started["decoder"] = time.perf_counter()
        self.decoder = ServerProcess("decoder", server_command("pllava-decoder") + common + ["--encoder", target],
                                     echo=None)
        self.decoder.wait_bound(300)

    @property
    def all(self):
        return [self.decoder] + self.encoders

    def wait_serving(self, timeout: float) -> dict[str, float]:
        import grpc

        from pllava_client.health import check_health

        deadline = time.monotonic() + timeout
        while len(self.serving) < len(self.all):
            for s in self.all:
                if s.name in self.serving:
                    continue
                if not s.alive():
                    raise RuntimeError(f"{s.name} exited with {s.process.poll()}:\n{s.tail(40)}")
                try:
                    if check_health(s.address, timeout=1.0) == "SERVING":
                        self.serving[s.name] = time.perf_counter()
                        log(f"servers: {s.name} SERVING after {self.serving[s.name] - self.started[s.name]:.1f} s")
                except grpc.RpcError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not SERVING within {timeout:g} s:\n" + "\n".join(s.tail(10) for s in self.all))
            time.sleep(0.2)
        return {n: self.serving[n] - self.started[n] for n in self.serving}

    def peak_rss(self) -> dict:
        out = {}
        for s in self.all:
            kids = descendants(s.pid)
            out[s.name] = {"peak_rss_bytes": vm_hwm(s.pid),
                           "children_peak_rss_bytes": sum(vm_hwm(k) or 0 for k in kids), "children": len(kids)}
        return out

    def stop(self) -> None:
        from pllava_serving.launcher import stop_all

        if self.decoder is not None:
            stop_all([self.decoder], 30)
        stop_all(self.encoders, 30)


def caption_concurrently(address: str, videos: list[tuple[str, bytes]], frames: int, new_tokens: int) -> dict:
    """One thread and one Client per video, all started together; client-side times and each
    caption's final event."""
    from pllava_client import Client

    barrier = threading.Barrier(len(videos))
    rows: list[dict] = [{} for _ in videos]

    def work(i: int, name: str, data: bytes) -> None:
        row = rows[i]
        try:
            with Client(address, timeout=1800) as client:
                barrier.wait(timeout=120)
                row["sent"] = time.perf_counter()
                stream = client.caption(data, num_frames=frames, max_new_tokens=new_tokens, video_name=name)
                for _ in stream:
                    row.setdefault("first_text", time.perf_counter())
                row["end"] = time.perf_counter()
                row["result"] = stream.result
        except Exception as exc:  # noqa: BLE001 - reported with the run
            row["error"] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=work, args=(i, n, d), daemon=True) for i, (n, d) in enumerate(videos)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(rows)} captions failed: {errors[0]}")
    start, end = min(r["sent"] for r in rows), max(r["end"] for r in rows)
    ttft = [r["result"].timings["time_to_first_token_ms"] / 1e3 for r in rows]
    first = [r["sent"] + t for r, t in zip(rows, ttft)]
    generated = [len(r["result"].token_ids) for r in rows]
    decode_span = end - min(first)
    wall = end - start
    return {
        "clients": len(rows), "frames": frames, "new_tokens": new_tokens, "wall_s": wall,
        "ttft_p50_s": statistics.median(ttft), "ttft_max_s": max(ttft), "ttft_s": ttft,
        "decode_tok_s": sum(max(g - 1, 0) for g in generated) / decode_span if decode_span > 0 else 0.0,
        "end_to_end_tok_s": sum(generated) / wall, "videos_per_min": len(rows) / wall * 60,
        "generated": generated, "cached": sum(r["result"].visual_tokens_cached for r in rows),
        "prompt_positions": [len(r["result"].prompt_token_ids) - 1 + r["result"].num_visual_tokens for r in rows],
        "server_timings": [r["result"].timings for r in rows],
        "tokens": [list(r["result"].token_ids) for r in rows],
        "videos": [n for n, _ in videos],
    }


def section_servers(b: Bench) -> dict:
    p = b.plan
    log(f"servers: starting {p.encoders} encoders + 1 decoder (default settings)")
    servers = Servers(b.model_dir, p.encoders)
    try:
        warm = servers.wait_serving(900)
        address = servers.decoder.address
        out: dict = {"warm_up_s": warm, "address": address}
        clips = b.videos

        def batch(tag: str, n: int) -> list[tuple[str, bytes]]:
            return [(f"{clips[i % len(clips)].name}#{tag}-{i}", media.variant(clips[i % len(clips)], f"{tag}-{i}"))
                    for i in range(n)]

        # compile probe: the first request at a prompt length not seen before, then the same length again
        probe = {}
        for what in ("first", "repeat"):
            run = caption_concurrently(address, [(f"{clips[0].name}#probe-{what}",
                                                  media.variant(clips[0], f"probe-{what}"))], p.probe_frames, 2)
            probe[what] = {"ttft_s": run["ttft_s"][0], "prefill_s": run["server_timings"][0]["prefill_ms"] / 1e3,
                           "prompt_positions": run["prompt_positions"][0]}
        probe["ttft_extra_s"] = probe["first"]["ttft_s"] - probe["repeat"]["ttft_s"]
        probe["prefill_ratio"] = probe["first"]["prefill_s"] / probe["repeat"]["prefill_s"]
        out["compile_probe"] = probe
        log(f"servers: compile probe at {probe['first']['prompt_positions']} positions: TTFT first "
            f"{probe['first']['ttft_s']:.2f} s, repeat {probe['repeat']['ttft_s']:.2f} s; prefill "
            f"{probe['first']['prefill_s']:.2f} vs {probe['repeat']['prefill_s']:.2f} s")

        runs = [(n, p.small_frames) for n in p.clients] + [(p.large_clients, p.large_frames)]
        out["runs"] = []
        for n, frames in runs:
            log(f"servers: {n} concurrent client(s), {frames} frames, {p.new_tokens} tokens")
            run = caption_concurrently(address, batch(f"run{n}x{frames}", n), frames, p.new_tokens)
            out["runs"].append(run)
            log(f"servers: {n} x {frames} frames: {run['wall_s']:.1f} s, {run['videos_per_min']:.2f} videos/min, "
                f"TTFT p50 {run['ttft_p50_s']:.2f} s max {run['ttft_max_s']:.2f} s, decode {run['decode_tok_s']:.1f} tok/s")
        out["peak_rss"] = servers.peak_rss()
        weights = b.held_weight_bytes()
        from pllava_client import Client

        with Client(address, timeout=60) as client:  # the cache the decoder runs with, as it reports it
            info = client.info()
        kv = kv_bytes(b.cfg, info.max_batch, info.max_context)
        out["decoder_budget"] = {"weights_bytes": weights["language"], "kv_bytes": kv,
                                 "kv_shape": {"slots": info.max_batch, "max_len": info.max_context},
                                 "budget_bytes": weights["language"] + kv + int(1.5 * GIB)}
        return out
    finally:
        servers.stop()


# ----------------------------------------------------------------------------- e. sequential

def section_sequential(b: Bench) -> dict:
    import hf_pllava as H
    from pllava.prompt import DEFAULT_QUESTION, DEFAULT_TEMPLATE, build_prompt
    from pllava.video import load_frames, preprocess

    p = b.plan
    hf = b.hf
    ids = b.tokenizer.encode(build_prompt(DEFAULT_QUESTION, DEFAULT_TEMPLATE))
    out = {}
    for frames in (p.small_frames, p.large_frames):
        cfg = b.cfg.with_frames(frames)
        log(f"sequential: transformers, {len(b.videos)} videos one at a time, {frames} frames, {p.new_tokens} tokens")
        start = time.perf_counter()
        rows = []
        for video in b.videos:
            t = time.perf_counter()
            pixels = preprocess(load_frames(video, cfg.num_frames).frames, b.preprocessor)
            visual = H.visual_tokens(hf, pixels, cfg.num_frames, cfg.pooling_shape)
            encoded = time.perf_counter()
            gen = H.greedy(hf, H.embeddings(hf, ids, visual), p.new_tokens, b.tokenizer.eos_token_id)
            rows.append({"video": video.name, "tokens": gen.tokens[0], "encode_s": encoded - t,
                         "ttft_s": encoded - t + gen.prefill_s, "decode_s": gen.decode_s,
                         "total_s": time.perf_counter() - t})
        wall = time.perf_counter() - start
        generated = [len(r["tokens"]) for r in rows]
        decode_s = sum(r["decode_s"] for r in rows)
        out[str(frames)] = {
            "videos": len(rows), "frames": frames, "wall_s": wall, "videos_per_min": len(rows) / wall * 60,
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in rows), "ttft_max_s": max(r["ttft_s"] for r in rows),
            "decode_tok_s": sum(max(g - 1, 0) for g in generated) / decode_s if decode_s else 0.0,
            "end_to_end_tok_s": sum(generated) / wall, "rows": rows,
            "prompt_positions": len(ids) - 1 + cfg.num_visual_tokens,
        }
        log(f"sequential: {frames} frames: {wall:.1f} s, {out[str(frames)]['videos_per_min']:.2f} videos/min")
    return out


# ----------------------------------------------------------------------------- summary

def server_agreement(results: dict) -> dict:
    """Servers' tokens against transformers one at a time, per video, at each frame count."""
    servers, seq = results.get("servers"), results.get("sequential")
    if not isinstance(servers, dict) or not isinstance(seq, dict) or "runs" not in servers or "error" in seq:
        return {}
    out = {}
    for run in servers["runs"]:
        ref = seq.get(str(run["frames"]))
        if not isinstance(ref, dict) or "rows" not in ref:
            continue
        by_video = {r["video"]: r["tokens"] for r in ref["rows"]}
        ours = [t for v, t in zip(run["videos"], run["tokens"])]
        theirs = [by_video[v.split("#")[0]] for v in run["videos"]]
        out[f"{run['clients']}x{run['frames']}"] = agreement(ours, theirs)
    return out


def sequential_for_run(run: dict, seq: dict) -> dict | None:
    """What transformers one video at a time does with the run's videos (the same clips, in
    the same order, all handed over at once): each waits for the ones before it, so its TTFT
    counts their whole time; rates are over the sum of the per-video times."""
    ref = seq.get(str(run["frames"])) if seq else None
    if not ref:
        return None
    rows = {r["video"]: r for r in ref["rows"]}
    picked = [rows[v.split("#")[0]] for v in run["videos"]]
    waited, ttft = 0.0, []
    for r in picked:
        ttft.append(waited + r["ttft_s"])
        waited += r["total_s"]
    generated = [len(r["tokens"]) for r in picked]
    decode_s = sum(r["decode_s"] for r in picked)
    return {"ttft_p50_s": statistics.median(ttft), "ttft_max_s": max(ttft), "wall_s": waited,
            "decode_tok_s": sum(max(g - 1, 0) for g in generated) / decode_s if decode_s else 0.0,
            "end_to_end_tok_s": sum(generated) / waited, "videos_per_min": len(picked) / waited * 60}


def videos_per_min_ceiling(ref: dict, engine) -> float | None:
    """What serving could reach at most on this machine when its encode and prefill cost what
    transformers' do (the same FLOPs on the same cores: compute-bound, unlike decode) and every
    generated token decoded at the engine's batched rate, with no stage overlapping another
    (they share the cores). A bound for judging the videos/min ratio, not a measurement."""
    if not isinstance(engine, dict) or "error" in engine or not ref.get("rows"):
        return None
    rate = engine["default"]["batch"]["decode_tok_s"]
    if not rate:
        return None
    rows = ref["rows"]
    per_video = statistics.mean(r["ttft_s"] + len(r["tokens"]) / rate for r in rows)
    return 60.0 / per_video


def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if x != x:  # nan
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def ratio(ours, theirs, higher_is_better: bool) -> str:
    if ours is None or theirs is None or not ours or not theirs:
        return "—"
    return f"{(ours / theirs if higher_is_better else theirs / ours):.2f}x"


def agree_text(a: dict | None) -> str:
    if not a:
        return "—"
    if a["agree"]:
        return f"yes ({a['pairs']}/{a['pairs']})" if a["pairs"] > 1 else "yes"
    m = a["first_mismatch"]
    return f"NO: {a['equal']}/{a['pairs']} equal, first mismatch at token {m['index']} (pair {m['pair']})"


def median_step_row(add, streams: str, steps: list) -> None:
    """The default/sized ratio read from the runs' median step times (default, sized): less
    swayed by one fast or slow run than the fastest runs' rates."""
    if None not in steps:  # (saved runs from before this row have none)
        add((f"decode, {streams}: default cache / sized cache, the median step of those runs "
             f"(ms: {fmt(steps[0] * 1e3, 1)} / {fmt(steps[1] * 1e3, 1)})", ratio(steps[0], steps[1], False), "—", "—"))


def table(results: dict, plan: Plan) -> list[str]:
    rows: list[tuple[str, str, str, str]] = []
    add = rows.append
    e = results.get("engine")
    if isinstance(e, dict) and "error" not in e:
        hf = e["transformers"]
        n = e["prompt_positions"]
        for name, label in (("default", f"default cache {plan.batch}x{plan.default_context}"),
                            ("sized", f"cache sized to the load {plan.batch}x{plan.sized_context}")):
            o = e[name]
            add((f"TTFT, batch 1, {n}-position prompt, {label} (s)", fmt(o["ttft_s"], 3), fmt(hf["ttft_s"], 3),
                 ratio(o["ttft_s"], hf["ttft_s"], False)))
            add((f"decode tok/s, 1 stream, {label}", fmt(o["batch1"]["decode_tok_s"], 1),
                 fmt(hf["batch1"]["decode_tok_s"], 1), ratio(o["batch1"]["decode_tok_s"], hf["batch1"]["decode_tok_s"], True)))
            add((f"decode tok/s, {plan.batch} streams (transformers: static batch), {label}",
                 fmt(o["batch"]["decode_tok_s"], 1), fmt(hf["batch"]["decode_tok_s"], 1),
                 ratio(o["batch"]["decode_tok_s"], hf["batch"]["decode_tok_s"], True)))
            add((f"end-to-end tok/s, {plan.batch} x ({n} + {plan.new_tokens}), prefill included, {label}",
                 fmt(o["batch"]["end_to_end_tok_s"], 1), fmt(hf["batch"]["end_to_end_tok_s"], 1),
                 ratio(o["batch"]["end_to_end_tok_s"], hf["batch"]["end_to_end_tok_s"], True)))
        add(("decode, 1 stream: default cache / sized cache (same engine)",
             ratio(e["default"]["batch1"]["decode_tok_s"], e["sized"]["batch1"]["decode_tok_s"], True), "—", "—"))
        median_step_row(add, "1 stream", [e[k]["batch1"].get("median_step_s") for k in ("default", "sized")])
        add((f"decode, {plan.batch} streams: default cache / sized cache (same engine)",
             ratio(e["default"]["batch"]["decode_tok_s"], e["sized"]["batch"]["decode_tok_s"], True), "—", "—"))
        median_step_row(add, f"{plan.batch} streams", [e[k]["batch"].get("median_step_s") for k in ("default", "sized")])
        add(("engine warm-up, default cache: graphs compiled in s", f"{e['default']['graphs']} in "
             f"{fmt(e['default']['warm_up_s'], 1)}", "—", "—"))
        agree = {"agree": e["agree"],
                 "pairs": sum(e[k][j]["pairs"] for k in ("sized", "default") for j in ("agree_batch1", "agree_batch")),
                 "equal": sum(e[k][j]["equal"] for k in ("sized", "default") for j in ("agree_batch1", "agree_batch")),
                 "first_mismatch": next((e[k][j]["first_mismatch"] for k in ("sized", "default")
                                         for j in ("agree_batch1", "agree_batch") if e[k][j]["first_mismatch"]), None)}
        add((f"greedy tokens equal to transformers, {n}-position prompt, 1 and {plan.batch} streams",
             agree_text(agree), "reference", "—"))
    a = results.get("admission")
    if isinstance(a, dict) and "error" not in a:
        if "steady_after_step_s" in a:
            add((f"steady decode step, {a['running_streams']} streams, default cache: before / after the admission (ms)",
                 f"{fmt(a['steady_step_s'] * 1e3, 0)} / {fmt(a['steady_after_step_s'] * 1e3, 0)}", "—", "—"))
        else:  # a run saved before the steps after the admission were timed
            add((f"steady decode step, {a['running_streams']} streams, default cache (ms)",
                 fmt(a["steady_step_s"] * 1e3, 0), "—", "—"))
        add((f"longest inter-token gap while a {a['admitted_frames']}-frame request ({a['admitted_positions']} positions) "
             f"is admitted (ms)", f"{fmt(a['max_gap_s'] * 1e3, 0)} ({a['gap_over_step']:.1f}x the step before)",
             "— (no continuous batching)", "—"))
        if "admission_steps" in a:
            add(("that admission: engine steps (one prefill chunk each) / seconds to its first token",
                 f"{a['admission_steps']} / {fmt(a['admission_ttft_s'], 1)}", "—", "—"))
        if len(a.get("admissions", ())) > 1:
            over = [r["gap_over_step"] for r in a["admissions"]]
            add((f"longest inter-token gap over {len(over)} such admissions in a row, x the step before each: "
                 f"median / max", f"{statistics.median(over):.1f}x / {max(over):.1f}x", "—", "—"))
        for lone in a.get("lone_stream", ()):
            add((f"the same admission beside {lone['running_streams']} stream: longest gap (ms) / steps / seconds to "
                 f"its first token", f"{fmt(lone['max_gap_s'] * 1e3, 0)} ({lone['gap_over_step']:.1f}x a "
                 f"{fmt(lone['steady_step_s'] * 1e3, 0)} ms step) / {lone['admission_steps']} / "
                 f"{fmt(lone['admission_ttft_s'], 1)}", "—", "—"))
    m = results.get("memory")
    if isinstance(m, dict) and "error" not in m:
        w = m["weights_bytes"]
        add((f"peak RSS, {m['frames']}-frame caption in process ({m['prompt_positions']} positions, "
             f"{m['new_tokens']} tokens) (GiB)", fmt(m["ours"]["peak_rss_bytes"] / GIB),
             fmt(m["transformers"]["peak_rss_bytes"] / GIB),
             ratio(m["ours"]["peak_rss_bytes"], m["transformers"]["peak_rss_bytes"], False)))
        add((f"  budget: weights as held {w['vision'] / GIB:.2f} + {w['language'] / GIB:.2f} + KV "
             f"{m['kv_bytes'] / GIB:.2f} (1 x {m['kv_shape']['max_len']}) + 1.5 GiB (GiB)",
             f"{fmt(m['budget_bytes'] / GIB)} (peak/budget {m['ours']['peak_rss_bytes'] / m['budget_bytes']:.2f})",
             "—", "—"))
        add((f"greedy tokens equal, {m['frames']}-frame caption in process", agree_text(m["agree"]), "reference", "—"))
    s = results.get("servers")
    q = results.get("sequential") if isinstance(results.get("sequential"), dict) and "error" not in results["sequential"] else {}
    q = {k: v for k, v in (q or {}).items() if isinstance(v, dict) and "videos_per_min" in v}
    if isinstance(s, dict) and "error" not in s:
        for name, secs in s["warm_up_s"].items():
            add((f"server warm-up, process start to SERVING: {name} (s)", fmt(secs, 1), "—", "—"))
        pr = s["compile_probe"]
        add((f"compile after warm-up: TTFT of the first request at a new length ({pr['first']['prompt_positions']} "
             f"positions) minus a repeat (s)", f"{fmt(pr['ttft_extra_s'])} (prefill {fmt(pr['first']['prefill_s'])} "
             f"vs {fmt(pr['repeat']['prefill_s'])} s, {pr['prefill_ratio']:.2f}x)", "0 (no compile)", "—"))
        for run in s["runs"]:
            ref = sequential_for_run(run, q)
            tag = f"{run['clients']} client{'s' if run['clients'] > 1 else ''}, {run['frames']} frames"
            add((f"servers {tag}: TTFT p50 / max (s)", f"{fmt(run['ttft_p50_s'])} / {fmt(run['ttft_max_s'])}",
                 f"{fmt(ref['ttft_p50_s'])} / {fmt(ref['ttft_max_s'])}" if ref else "—",
                 ratio(run["ttft_p50_s"], ref and ref["ttft_p50_s"], False)))
            for key, label in (("decode_tok_s", "aggregate decode tok/s"), ("end_to_end_tok_s", "end-to-end tok/s"),
                               ("videos_per_min", "videos/min")):
                theirs = ref[key] if ref else None
                add((f"servers {tag}: {label}", fmt(run[key], 1), fmt(theirs, 1), ratio(run[key], theirs, True)))
        for frames, ref in q.items():
            best = videos_per_min_ceiling(ref, e)
            if best:
                add((f"ceiling, {frames} frames: videos/min if each video cost transformers' encode + prefill and "
                     f"its tokens decoded at the engine's {plan.batch}-stream rate (2 cores: the stages share them)",
                     fmt(best, 1), fmt(ref["videos_per_min"], 1), ratio(best, ref["videos_per_min"], True)))
        for name, rss in s["peak_rss"].items():
            extra = (f" + {rss['children_peak_rss_bytes'] / GIB:.2f} in {rss['children']} child process(es)"
                     if rss["children"] else "")
            add((f"peak RSS, {name} process (GiB)", f"{fmt((rss['peak_rss_bytes'] or 0) / GIB)}{extra}", "—", "—"))
        bud = s["decoder_budget"]
        peak = s["peak_rss"].get("decoder", {}).get("peak_rss_bytes") or 0
        add((f"  decoder budget: weights as held {bud['weights_bytes'] / GIB:.2f} + KV {bud['kv_bytes'] / GIB:.2f} "
             f"({bud['kv_shape']['slots']} x {bud['kv_shape']['max_len']}) + 1.5 GiB (GiB)",
             f"{fmt(bud['budget_bytes'] / GIB)} (peak/budget {peak / bud['budget_bytes']:.2f})", "—", "—"))
        agreement_rows = server_agreement(results)
        for key, a_ in agreement_rows.items():
            clients, frames = key.split("x")
            add((f"greedy tokens equal, servers ({clients} client{'s' if clients != '1' else ''}, {frames} frames) "
                 "vs transformers per video",
                 agree_text(a_), "reference", "—"))
        if not agreement_rows:
            add(("greedy tokens, servers vs transformers", "not compared (no transformers run: the sequential "
                 "section)", "—", "—"))
    elif q:
        for frames, ref in q.items():
            add((f"transformers one video at a time, {frames} frames: videos/min", "—", fmt(ref["videos_per_min"], 2), "—"))
    lines = ["| metric | this project | transformers 5.24 | ratio¹ |", "|---|---|---|---|"]
    lines += [f"| {a_} | {b_} | {c_} | {d_} |" for a_, b_, c_, d_ in rows]
    return lines


def notes(results: dict, plan: Plan, model_dir: Path) -> list[str]:
    mc = results["machine"]
    cfg = results.get("checkpoint", {})
    return [
        "",
        "¹ ratio > 1 means this project is better: ours/transformers for rates (tok/s, videos/min), "
        "transformers/ours for times and memory.",
        f"Machine: {mc.get('arch')}, {mc.get('cores')} cores ({mc.get('cpu', '?')}), "
        f"{mc.get('ram_gib', 0):.0f} GiB RAM; MindSpore {mc.get('mindspore', '?')} (CPU, fp32), "
        f"torch {mc.get('torch', '?')}, transformers {mc.get('transformers', '?')}.",
        f"Checkpoint: {model_dir} ({cfg.get('description', '')}), random weights, the same for both.",
        f"Servers: {plan.encoders} encoders + 1 decoder as processes, default settings; N clients start together, each "
        "with a different video (no visual-token cache hits), default prompt, greedy; TTFT as the decoder reports it "
        "(video decode, encode, queue and prefill included); aggregate decode tok/s = tokens after each stream's "
        "first / (last finish - earliest first token). Their transformers column is the same videos one at a time "
        "(frames read by pllava.video, then transformers' CLIP, projector, pooling and generate), all handed over "
        "at once: a video's TTFT includes the videos before it.",
        f"Total wall time of this run: {results.get('total_s', 0):.0f} s; load average (1 min) at its start "
        f"{results.get('load_average_at_start', [float('nan')])[0]:.2f} (other work on the machine slows transformers' threads most).",
    ] + tile_note(results.get("engine", {}))


def tile_note(engine: dict) -> list[str]:
    """Where our prefill ran on AMX tiles: how long a tile product took beside the TTFT runs."""
    ns = engine.get("tile_product_ns")
    if not ns:
        return []
    return [f"AMX tile product beside the TTFT runs: {min(ns):.1f}-{max(ns):.1f} ns (median "
            f"{statistics.median(ns):.1f}); our prompt's projections, most of its TTFT, run on the tiles and "
            "slow as this grows (the Xeon hosts here: ~7 ns in calm stretches, 15-17 in others)."]


# ----------------------------------------------------------------------------- main

def print_saved(files: list[Path]) -> int:
    """The table of one or more saved runs (sections merged; the first file's machine notes)."""
    merged: dict = {}
    for f in files:
        data = json.loads(f.read_text())
        for key, value in data.items():
            if key not in merged or key in SECTIONS:
                merged[key] = value
    plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged["plan"].items()})
    merged["server_agreement"] = server_agreement(merged)
    merged["total_s"] = sum(merged[n].get("section_s", 0) for n in SECTIONS if isinstance(merged.get(n), dict))
    print("\n".join(table(merged, plan) + notes(merged, plan, Path(merged["checkpoint"]["path"]))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PLLaVA serving benchmark against transformers (issue 6)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny checkpoint, few tokens, 2 videos, 1-2 clients: a smoke test (CI)")
    parser.add_argument("--json", metavar="OUT", help="write every raw number here")
    parser.add_argument("--model", metavar="DIR",
                        help="checkpoint folder (made there if absent; default ~/.cache/pllava/bench-serving-16f, "
                             "or a temporary tiny one with --quick)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="NAME",
                        help=f"sections to run (default all: {' '.join(SECTIONS)})")
    parser.add_argument("--videos-dir", metavar="DIR", help="where the test clips are made (default: cache)")
    parser.add_argument("--admissions", type=int, metavar="N",
                        help="admissions of the long prompt in a row in the admission section (default 1): the "
                             "table adds the median and largest of their longest waits")
    parser.add_argument("--from-json", nargs="+", metavar="JSON",
                        help="measure nothing: print the table of earlier runs' JSON (later files' sections win)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.from_json:
        return print_saved([Path(f) for f in args.from_json])
    plan = QUICK if args.quick else DEFAULT
    if args.admissions is not None:
        if args.admissions < 1:
            parser.error(f"--admissions must be at least 1, got {args.admissions}")
        plan = replace(plan, admissions=args.admissions)
    tmp = Path(tempfile.mkdtemp(prefix="pllava-bench-")) if args.quick else None
    try:
        if args.model:
            model_dir = ensure_checkpoint(Path(args.model).expanduser().resolve(), plan.preset, plan.large_frames)
        elif args.quick:
            model_dir = ensure_checkpoint(tmp / "tiny", "tiny", plan.large_frames)
        else:
            model_dir = ensure_checkpoint(cache_dir() / "bench-serving-16f", "serving", plan.large_frames)
        videos_dir = Path(args.videos_dir) if args.videos_dir else (tmp / "videos" if tmp else cache_dir() / "bench-videos")
        videos = media.make_videos(videos_dir, plan.videos)
        log(f"checkpoint {model_dir}; {len(videos)} videos in {videos_dir}")
        bench = Bench(plan, model_dir, videos)
        t = bench.cfg.text
        v = bench.cfg.vision
        results: dict = {
            "quick": args.quick, "plan": asdict(plan), "machine": machine(), "sections": args.sections,
            "load_average_at_start": os.getloadavg(),
            "checkpoint": {"path": str(model_dir), "description":
                           f"CLIP {v.hidden_size}x{v.num_hidden_layers} @{v.image_size}px, {bench.cfg.num_frames} frames, "
                           f"pooling {'x'.join(map(str, bench.cfg.pooling_shape))}, LLaMA {t.hidden_size}x"
                           f"{t.num_hidden_layers}, {t.num_attention_heads} heads, vocab {t.vocab_size}"},
        }
        funcs = {"engine": section_engine, "admission": section_admission, "memory": section_memory,
                 "servers": section_servers, "sequential": section_sequential}
        for name in SECTIONS:
            if name not in args.sections:
                continue
            t0 = time.perf_counter()
            load = os.getloadavg()[0]
            try:
                results[name] = funcs[name](bench)
            except Exception as exc:  # noqa: BLE001 - a failed section is reported, the others still run
                log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            results[name]["section_s"] = time.perf_counter() - t0
            results[name]["load_average_1min"] = [load, os.getloadavg()[0]]
            if name == "admission" or (name == "engine" and "admission" not in args.sections):
                bench.drop_default_language()
        results["server_agreement"] = server_agreement(results)
        results["total_s"] = time.perf_counter() - T0
        lines = table(results, plan) + notes(results, plan, model_dir)
        results["table"] = lines
        print("\n".join(lines), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
        failed = [n for n in args.sections if "error" in results[n]]
        disagree = []
        if "engine" in args.sections and "error" not in results["engine"] and not results["engine"]["agree"]:
            disagree.append("engine")
        if "memory" in args.sections and "error" not in results["memory"] and not results["memory"]["agree"]["agree"]:
            disagree.append("memory")
        disagree += [f"servers {k}" for k, a_ in results["server_agreement"].items() if not a_["agree"]]
        if failed or disagree:
            log(f"FAILED sections: {failed}; tokens differ from transformers in: {disagree}")
            return 1
        log(f"done in {results['total_s']:.0f} s")
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
