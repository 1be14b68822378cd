"""Smoke tests: every benchmark script runs at tiny sizes and appends CSV rows, and the plot
script draws from them. No timing assertions: speed targets live in the benchmarks' results."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["date", "run", "hardware", "versions", "bench", "variant", "shape", "figure", "value"]


def _run(script, *args, timeout=180):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def test_bench_schedule_writes_rows(tmp_path):
    out = tmp_path / "schedule.csv"
    _run("bench_schedule.py", "--P", 2, 3, "--tokens", 32, "--repeats", 1, "--heads", 2, "--kv-heads", 1, "--head-dim", 16,
         "--variants", "striped", "striped@4", "zigzag", "contiguous", "--out", out)
    rows = _rows(out)
    figures = {(r["variant"], r["figure"]) for r in rows}
    for v in ("striped", "striped@4", "zigzag", "contiguous"):
        assert {(v, "efficiency"), (v, "critical_path_s"), (v, "ratio_to_contiguous"), (v, "block_s")} <= figures
    # the whole ring, split or not, computes the same attention
    assert all(float(r["value"]) < 1e-5 for r in rows if r["figure"] == "max_abs_diff_vs_unsplit")
    cells = [r for r in rows if r["figure"] == "block_s" and r["variant"] == "striped" and "P=3;" in r["shape"]]
    assert len(cells) == 2 * 9  # fwd and bwd, every (rank, step)
    _run("bench_schedule.py", "--P", 2, "--tokens", 32, "--repeats", 1, "--no-check", "--distinct", "--out", out)
    assert len({r["run"] for r in _rows(out)}) == 2  # appended, not overwritten

    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    _run("plot_benchmarks.py", "--results", tmp_path, "--out", plots, "--heatmap", 3, 32)
    assert {"schedule_heatmap.png", "efficiency.png", "summary.md"} <= {p.name for p in plots.iterdir()}
    assert "| 3 | 32 | striped |" in (plots / "summary.md").read_text()


def test_bench_e2e_writes_rows(tmp_path):
    out = tmp_path / "e2e.csv"
    _run("bench_e2e.py", "--nproc", 2, "--seq-len", 64, "--steps", 1, "--warmup", 0, "--hidden", 32,
         "--intermediate", 64, "--layers", 1, "--heads", 2, "--kv-heads", 1, "--vocab", 64, "--out", out)
    rows = _rows(out)
    for lay in ("striped", "zigzag", "contiguous"):
        got = {r["figure"] for r in rows if r["variant"] == lay}
        assert {"step_s", "tokens_per_s", "ratio_to_contiguous", "ring_wait_min_s", "grad_allreduce_s"} <= got


def test_bench_memory_writes_rows(tmp_path):
    out = tmp_path / "memory.csv"
    _run("bench_memory.py", "--P", 1, 2, "--seq-len", 128, "--start-tokens", 32, "--max-tokens", 256,
         "--cap-mib", 1, "--hidden", 32, "--intermediate", 64, "--heads", 2, "--kv-heads", 1, "--vocab", 64,
         "--out", out)
    rows = _rows(out)
    peaks = {r["shape"].split(";")[0]: float(r["value"]) for r in rows if r["figure"] == "peak_bytes"}
    assert set(peaks) == {"P=1", "P=2"} and peaks["P=2"] < peaks["P=1"]
    assert {r["figure"] for r in rows} >= {"max_tokens_under_cap", "peak_x_P_over_P1", "peak_bytes_trial"}


def test_bench_packed_writes_rows(tmp_path):
    out = tmp_path / "packed.csv"
    _run("bench_packed.py", "--quick", "--out", out)
    rows = _rows(out)
    variants = ("striped", "striped_plain", "zigzag_padded", "contiguous")
    mixes = ("chat", "code", "one_long")
    eff = {}
    for r in rows:
        if r["figure"] == "efficiency":
            shape = dict(kv.split("=", 1) for kv in r["shape"].split(";"))
            eff[(r["variant"], shape["mix"], shape["pass_"])] = float(r["value"])
    assert set(eff) == {(v, m, p) for v in variants for m in mixes for p in ("fwd", "fwdbwd")}
    assert all(0 < e <= 1.5 for e in eff.values()), eff
    figures = {(r["variant"], r["figure"]) for r in rows}
    for v in variants:
        assert {(v, f) for f in ("critical_path_s", "ideal_s", "ring_bytes_per_step", "kernel_calls", "padding_tokens",
                                 "token_imbalance", "block_s")} <= figures
    assert [float(r["value"]) for r in rows if r["variant"] == "striped" and r["figure"] == "token_imbalance"] == [0] * 3
    # every layout's ring computes each document's own attention (zigzag_padded: its real tokens)
    diffs = [float(r["value"]) for r in rows if r["figure"] == "max_abs_diff_vs_documents"]
    assert len(diffs) == 12 and max(diffs) < 1e-5
    padding = [float(r["value"]) for r in rows if r["variant"] == "zigzag_padded" and r["figure"] == "padding_tokens"]
    assert len(padding) == 3 and all(x > 0 for x in padding)

    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    _run("plot_benchmarks.py", "--results", tmp_path, "--out", plots)
    assert {"packed_efficiency.png", "summary.md"} <= {p.name for p in plots.iterdir()}
    assert "| chat | 2 | 128 | " in (plots / "summary.md").read_text()


def test_bench_generate_writes_rows(tmp_path):
    out = tmp_path / "generate.csv"
    _run("bench_generate.py", "--quick", "--out", out)
    rows = _rows(out)
    fig = {(r["variant"], r["shape"].split(";")[0], r["figure"]): float(r["value"]) for r in rows}
    for n in ("N=64", "N=129"):
        for v in ("one_process", "striped_cp2"):
            assert {(v, n, f) for f in ("prefill_s", "decode_ms_per_token", "cache_bytes_per_rank_max")} <= set(fig)
        assert fig[("striped_cp2", n, "tokens_match_one_process")] == 1  # exact: the same greedy tokens
        assert fig[("striped_cp2", n, "all_gathers_per_token_per_layer")] == 1  # one all-gather per layer per token
        assert fig[("striped_cp2", n, "cache_ratio_to_one_process")] <= 0.5 + 1 / 64  # each rank holds half the K/V
        assert fig[("one_process", n, "collectives_per_token")] == 0

    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    _run("plot_benchmarks.py", "--results", tmp_path, "--out", plots)
    assert {"generate.png", "summary.md"} <= {p.name for p in plots.iterdir()}
    assert "| 129 | striped_cp2 | " in (plots / "summary.md").read_text()
