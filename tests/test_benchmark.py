"""The benchmark job runs end to end in its quick mode and writes a complete, sane report.

Benchmarks are not tests: nothing here checks a timing against a target (a missed target is a finding the
report shows, not a failure). What is checked is that every item is measured and every number is a real one,
so the benchmark cannot rot unnoticed."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITEMS = {"1", "2", "3", "4", "5", "6", "7", "8", "9"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    work = tmp_path_factory.mktemp("bench_work")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, never a shared one
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO,
               VIDEO2LORA_CACHE=str(work / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "benchmark.py"), "--quick", "--out", str(out),
                           "--work", str(work)], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads((out / "benchmark.json").read_text())
    return report, (out / "benchmark.md").read_text(), proc.stdout


def test_every_item_is_measured(quick_report):
    report, md, stdout = quick_report
    assert report["errors"] == {}
    assert {r["item"] for r in report["table"]} == ITEMS
    assert set(report["sections"]) == {"lightlora", "mixed_lora", "pipeline", "training", "scale", "step_cost", "serve"}
    scale = report["sections"]["scale"]["result"]
    # a resume's S3 requests grow with listing pages (1,000 keys each), not with rows
    assert scale["to_do"] == scale["rows"] - scale["finished"] - scale["killed"]
    assert scale["requests"] < scale["rows"] / 20
    assert not [r["name"] for r in report["table"] if r["name"].startswith("not measured")]
    assert report["machine"]["cpus"] >= 1 and report["args"]["quick"] is True


def test_numbers_are_sane(quick_report):
    report, _, _ = quick_report
    for r in report["table"]:
        v = r["value"]
        assert isinstance(v, (int, float)) and math.isfinite(v), r
        if r["unit"] == "%":  # a relative overhead: may come out slightly negative on a noisy machine
            assert v > -1, r
        elif r["name"].endswith("requests lost"):  # a count whose target is 0
            assert v == 0, r
        else:
            assert v > 0, r
        if r["target"]:
            assert isinstance(r["met"], bool), r
    p = report["sections"]["pipeline"]["result"]
    for run in p["runs"]["pipeline_1_actor"] + p["runs"]["pipeline_2_actors"]:
        assert run["rows_ok"] == p["rows"] and run["rows_failed"] == 0
        assert sum(run["generation_batches"]) == p["rows"]
    assert all(b["denoise_s"] > 0 for b in p["runs"]["baseline"])
    mixed = report["sections"]["mixed_lora"]["result"]
    assert mixed["stock_vs_ours_max_abs_diff"] < 1e-2  # the stock loop makes the same videos: a fair comparison
    for case in report["sections"]["lightlora"]["result"]:
        assert case["lora_changes_output"] > 0 and case["lora_total_bytes"] > case["weights_bytes"] > 0


def test_markdown_has_the_table(quick_report):
    report, md, stdout = quick_report
    assert "| # | Measurement | Value | Target | Met? |" in md
    assert md.count("\n| ") == len(report["table"]) + 1  # header + one line per measurement
    assert "Machine:" in md and "CPU cores" in md
    assert "| # | Measurement | Value | Target | Met? |" in stdout  # printed as well


def test_helpers():
    from pipelines.benchmarks import measure as bench

    calls = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b"] and len(times["a"]) == len(times["b"]) == 2
    assert bench.median_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    s = bench.steady_state([10.0, 10.1, 20.0, 20.2, 30.0, 30.4], batch_size=2)
    assert s["first_row_out_s"] == 10.0 and s["steady_s_per_row"] == pytest.approx((30.4 - 10.1) / 4)
    table = bench.markdown_table([{"item": "1", "name": "x", "value": 0.031, "unit": "%", "target": "< +5 %", "met": True,
                                   "alt_value": 0.2, "alt_label": "wall"}])
    assert "| 1 | x | +3.1 % (wall: +20.0 %) | < +5 % | yes |" in table
