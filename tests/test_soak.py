"""The soak script (``benchmarks/soak.py``) for a few seconds, so that it keeps working: it
captions, samples memory, stops the servers and reads back what they held. Numbers are
recorded, never asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOAK = REPO / "benchmarks" / "soak.py"


def test_a_short_soak_runs_and_reports_everything(tiny_model_dir, tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--seconds", "6", "--clients", "3", "--sample-s", "2",
                           "--cancel-every", "2", "--model", str(tiny_model_dir), "--json", str(out),
                           # the other suites' decoder shape: its compiled graphs are cached already
                           "--decoder-setting", "max_context=1024"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"soak failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| metric | value |"
    for row in ("captions done", "errors by status | none", "TTFT p50 / p99", "latency p50 / p99",
                "RSS decoder", "RSS encoder-0", "RSS encoder-1", "held at the end, decoder | 0 of 8 KV slots"):
        assert any(row in line for line in table), f"no {row!r} row in\n" + "\n".join(table)

    data = json.loads(out.read_text())
    assert data["done"] > 0 and data["errors"] == {}
    assert data["ttft_p50_s"] <= data["latency_p50_s"]
    assert len(data["memory_samples"]) >= 3
    assert all(row["decoder"] > 0 and row["encoder-0"] > 0 for row in data["memory_samples"])
    assert data["held"] == {"decoder": {"slots": 0, "slots_total": 8, "waiting": 0, "streams": 0},
                            "encoder-0": {"requests": 0}, "encoder-1": {"requests": 0}}
