"""`hetmerge bench` runs the benchmark suites shipped in the package from any folder (a wheel has no
bench/ folder): ratio tables of numbers with thread counts, a JSON record and a plot."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hetmerge
from hetmerge.benchmarks import SUITES, collect

PKG_PARENT = str(Path(hetmerge.__file__).resolve().parent.parent)


def test_bench_runs_without_a_bench_folder(tmp_path):
    """Regression: outside a source checkout `hetmerge bench` answered 'no bench/ folder found'."""
    env = {**os.environ, "PYTHONPATH": PKG_PARENT}
    proc = subprocess.run([sys.executable, "-m", "hetmerge.cli", "bench", "--widths", "8", "16", "--repeat", "1",
                           "--threads", "1", "-o", "out"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "bench").exists()
    out = tmp_path / "out"
    assert (out / "bench_time_vs_width.png").stat().st_size > 1000
    rec = json.loads((out / "bench.json").read_text())
    assert rec["notes"] == []                     # every suite ran (lapx is a test dependency here)
    rows = rec["rows"]
    prims = {r["primitive"] for r in rows}
    assert {"permute_pad", "interpolate", "weighted_sum", "cost_matrix", "linear_assignment",
            "align (weight matching)", "sweep"} <= prims
    for r in rows:
        assert r["width"] in (8, 16)
        assert any(k.endswith("thr") for k in r), r          # thread counts on every row
        times = {k: v for k, v in r.items() if k.endswith("_s")}
        assert "ours_s" in times and len(times) >= 2, r       # ours and at least one reference
        ratios = {k: v for k, v in r.items() if k.startswith(("ratio", "speedup"))}
        assert ratios, r
        for k, v in {**times, **ratios}.items():
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (k, v, r)
        # a ratio is the quotient of the times it names (reference / ours, or ours / reference)
        if "speedup" in r and "torch_s" in r:
            assert r["speedup"] == pytest.approx(r["torch_s"] / r["ours_s"])
        if "ratio_vs_lean" in r:
            assert r["ratio_vs_lean"] == pytest.approx(r["lean_loop_s"] / r["ours_s"])
            assert r["same_acc"] and r["max_loss_diff"] < 1e-4
    la = [r for r in rows if r["primitive"] == "linear_assignment"]
    assert all(r["ref_thr"] == 1 and r["ours_thr"] == 1 and r["objective_equal"] for r in la)
    # the terminal shows the tables
    for name in ("interpolate", "linear_assignment", "sweep"):
        assert f"\n{name}\n" in proc.stdout
    assert "ours_s" in proc.stdout and "torch_thr" in proc.stdout


def test_bench_missing_reference_package_names_the_extra(monkeypatch):
    """A suite whose reference package is absent is skipped with a note naming hetmerge[bench]."""
    monkeypatch.setitem(sys.modules, "lap", None)      # import lap -> ImportError
    rows, notes = collect([8], 1, only=["linear_assignment"], log=lambda *_: None)
    assert rows == []
    assert len(notes) == 1 and "pip install 'hetmerge[bench]'" in notes[0] and "lap" in notes[0]


def test_bench_only_rejects_unknown_suite(capsys):
    from hetmerge.cli import main

    assert main(["bench", "--only", "nosuch", "--widths", "8"]) != 0
    assert "nosuch" in capsys.readouterr().err
    assert "sweep" in SUITES
