"""Smoke test of the benchmark (``benchmarks/bench.py --quick``): every section runs on a tiny
checkpoint and every greedy token comparison with transformers agrees. Times are recorded,
never asserted."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench.py"
SECTIONS = ("engine", "admission", "memory", "servers", "sequential")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out), "--admissions", "2"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    return proc, out


def test_quick_run_succeeds_and_prints_one_table(quick):
    proc, _ = quick
    assert proc.returncode == 0, f"bench --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| metric | this project | transformers 5.24 | ratio¹ |"
    assert len(table) > 20


def test_the_table_bounds_videos_per_min_by_the_compute_transformers_spends(quick):
    """The ceiling row: transformers' own encode + prefill time per video plus its tokens at
    the engine's batched decode rate, one row per frame count of the sequential run."""
    proc, out = quick
    data = json.loads(out.read_text())
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ceiling, ")]
    runs = [k for k, v in data["sequential"].items() if isinstance(v, dict) and v.get("rows")]
    assert runs and len(rows) == len(runs)
    rate = data["engine"]["default"]["batch"]["decode_tok_s"]
    for row in rows:
        frames = row.split(",")[1].split()[0]
        ref = data["sequential"][frames]
        per_video = sum(r["ttft_s"] + len(r["tokens"]) / rate for r in ref["rows"]) / len(ref["rows"])
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(60 / per_video, rel=0.06, abs=0.06)


def test_json_has_every_section_without_errors(quick):
    _, out = quick
    data = json.loads(out.read_text())
    assert data["quick"] is True
    for name in SECTIONS:
        assert name in data, f"section {name} missing from the JSON"
        assert "error" not in data[name], f"section {name} failed: {data[name].get('traceback', data[name])}"
    assert data["machine"]["cores"] >= 1 and data["total_s"] > 0
    from pllava import cpu_kernels  # a tile probe beside each TTFT trio, where the prefill runs on AMX tiles
    probes = data["engine"].get("tile_product_ns", [])
    assert len(probes) == (data["plan"]["ttft_repeats"] if cpu_kernels.half_linear_tiles() else 0)
    assert all(ns > 0 for ns in probes)
    slowest = data["admission"]["slowest_steps"]  # what the longest waits of the admission were made of
    assert slowest and all(s["decode_rows"] > 0 for s in slowest)
    assert [s["seconds"] for s in slowest] == sorted((s["seconds"] for s in slowest), reverse=True)
    assert max(s["seconds"] for s in slowest) <= data["admission"]["admission_ttft_s"]
    assert all(s["chunk_part"] in (0, 1, 2) for s in slowest)  # (2 parts by default)
    fed = data["admission"]["chunks_fed"]  # how the prompt entered: positions fed per chunk, whole or in parts
    positions = sum(int(kind.split()[0]) * n for kind, n in fed.items() if kind != "steps of parts")
    assert fed and all(n > 0 for n in fed.values()) and 0 < positions <= data["admission"]["admitted_positions"]
    a = data["admission"]  # the steady steps after the admission as well as before it
    assert len(a["steady_after_steps_s"]) == len(a["steady_steps_s"]) == data["plan"]["steady_steps"]
    assert a["gap_over_step_after"] == pytest.approx(a["max_gap_s"] / statistics.median(a["steady_after_steps_s"]))


def test_admissions_in_a_row_each_report_their_longest_wait(quick):
    """--admissions 2: the JSON holds both admissions (the first is the section's own numbers)
    and the table their longest waits' median and largest, over the step before each."""
    proc, out = quick
    a = json.loads(out.read_text())["admission"]
    runs = a["admissions"]
    assert len(runs) == 2 and runs[0]["max_gap_s"] == a["max_gap_s"] and runs[0]["chunks_fed"] == a["chunks_fed"]
    for r in runs:
        assert r["gap_over_step"] == pytest.approx(r["max_gap_s"] / r["steady_step_s"])
        assert r["admission_steps"] > 0 and r["chunks_fed"] and len(r["slowest_steps"]) <= 3
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| longest inter-token gap over 2 such"))
    over = [r["gap_over_step"] for r in runs]
    assert row.split("|")[2].strip() == f"{statistics.median(over):.1f}x / {max(over):.1f}x"


def test_the_admission_is_measured_beside_a_lone_stream_too(quick):
    """The admission section admits the same prompt beside one stream (the step that hides
    the least of a chunk) and the table prints its longest wait over that stream's step."""
    proc, out = quick
    a = json.loads(out.read_text())["admission"]
    assert a["running_streams"] == json.loads(out.read_text())["plan"]["batch"] - 1
    (lone,) = a["lone_stream"]
    assert lone["running_streams"] == 1 and lone["admission_steps"] > 0 and lone["chunks_fed"]
    assert lone["gap_over_step"] == pytest.approx(lone["max_gap_s"] / lone["steady_step_s"])
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| the same admission beside 1 stream"))
    assert row.split("|")[2].strip().startswith(f"{lone['max_gap_s'] * 1e3:.0f} ({lone['gap_over_step']:.1f}x a ")


def test_greedy_tokens_agree_with_transformers(quick):
    _, out = quick
    data = json.loads(out.read_text())
    engine = data["engine"]
    assert engine["agree"] is True
    for cache in ("default", "sized"):
        assert engine[cache]["agree_batch1"]["agree"] and engine[cache]["agree_batch"]["agree"]
        assert engine[cache]["batch1"]["tokens"] == engine["transformers"]["batch1"]["tokens"]
        assert engine[cache]["batch1"]["tokens"], "no tokens were generated"
    assert data["memory"]["agree"]["agree"]
    assert data["memory"]["ours"]["tokens"] == data["memory"]["transformers"]["tokens"]
    runs = data["server_agreement"]
    assert len(runs) == len(data["servers"]["runs"]) and all(a["agree"] for a in runs.values())
    # the servers' tokens, video by video, are transformers' tokens one video at a time
    seq = data["sequential"]
    for run in data["servers"]["runs"]:
        by_video = {r["video"]: r["tokens"] for r in seq[str(run["frames"])]["rows"]}
        for video, tokens in zip(run["videos"], run["tokens"]):
            assert tokens == by_video[video.split("#")[0]]


def test_agreement_can_fail():
    """The comparison the run's exit status rests on detects a differing token."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    assert bench.agreement([[1, 2, 3]], [[1, 2, 3]])["agree"]
    differ = bench.agreement([[1, 2, 3], [1, 2, 3]], [[1, 2, 3], [1, 5, 3]])
    assert not differ["agree"] and differ["first_mismatch"] == {"pair": 1, "index": 1}
    assert not bench.agreement([[1, 2]], [[1, 2, 3]])["agree"]  # one stopped early


@pytest.mark.parametrize("run,streams", [("batch", "8 streams"), ("batch1", "1 stream")])
def test_the_default_over_sized_ratio_is_also_read_from_the_runs_median_steps(quick, run, streams):
    """Beside the fastest runs' rates, the median decode step of each cache's runs (8 streams,
    and 1): a ratio that one fast or slow ~3-s run does not sway."""
    proc, out = quick
    data = json.loads(out.read_text())
    steps = {k: data["engine"][k][run]["median_step_s"] for k in ("default", "sized")}
    assert all(v > 0 for v in steps.values())
    assert all(len(data["engine"][k][run]["median_step_s_all"]) == 4 for k in steps)  # one per run
    row = [line for line in proc.stdout.splitlines() if f"decode, {streams}: default cache / sized cache, the median" in line]
    assert len(row) == 1 and f"| {steps['sized'] / steps['default']:.2f}x |" in row[0]


def test_one_stream_runs_as_often_as_eight_and_its_default_over_sized_ratio_is_printed(quick):
    """One stream's rate is the fastest of as many alternating runs as 8 streams get (one run
    each swayed the default/sized ratio by a tenth), every run's tokens checked."""
    proc, out = quick
    data = json.loads(out.read_text())
    repeats = data["plan"]["batch_repeats"]
    rates = {k: data["engine"][k]["batch1"]["decode_tok_s_all"] for k in ("default", "sized")}
    for k, runs in rates.items():
        assert len(runs) == repeats and data["engine"][k]["batch1"]["decode_tok_s"] == max(runs)
        assert data["engine"][k]["agree_batch1"]["pairs"] == repeats
    row = [line for line in proc.stdout.splitlines() if "decode, 1 stream: default cache / sized cache (same" in line]
    assert len(row) == 1 and f"| {max(rates['default']) / max(rates['sized']):.2f}x |" in row[0]
