"""Smoke test of the federation-overhead benchmark: every scenario at toy size,
output files present and figures consistent (not timings: those go in results)."""

from __future__ import annotations

import json
import math

from benchmarks.federation import DEMO_LOCAL_ROW, DEMO_ROW, OVERLAP_ROW, QUICK, run_all
from benchmarks.report import SEPARATE, figures, separate, write_outputs


def test_every_scenario_runs_and_figures_are_consistent(tmp_path):
    res = run_all(QUICK)
    paths = write_outputs(res, tmp_path, "smoke")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    data = json.loads(paths[0].read_text())
    names = set(data["scenarios"])
    assert {"centralised", "all-reduce (DDP gloo)", "local loop (no federation)", DEMO_LOCAL_ROW} <= names
    assert {f"DiLoCo H={h}" for h in QUICK.hs} <= names and any(n.startswith("FedAvg") for n in names)
    for name, s in res["scenarios"].items():
        f = figures(s)
        assert f["tokens"] > 0 and f["wall"] > 0, name
        assert 0 < f["compute-share"] <= 1, name
        if name != "centralised" and not name.startswith("local"):
            assert f["bytes"] > 0, name  # measured traffic, not computed
        if s.get("dp"):  # DP's noise is the cost this row shows: finite, and its epsilon reported
            assert all(math.isfinite(v) and v > 0 for v in s["eval"].values()), (name, s["eval"])
            assert s["dp"]["epsilon"] > 0 and s["dp"]["noise-multiplier"] > 0, s["dp"]
        elif "eval" in s:
            assert all(2.0 < v < 6.0 for v in s["eval"].values()), (name, s["eval"])
    assert any(s.get("dp") for s in res["scenarios"].values())
    # The optional overlap: each round after the first had its first k steps trained ahead, on every centre.
    k, demo_rows = QUICK.overlap, [n for n in names if n.startswith(f"DiLoCo H={QUICK.demo_h} ")]
    shared = [n for n in demo_rows if not separate(n)]
    assert len(shared) == 3, demo_rows  # demo default, with overlap, with overlap and int8
    # Again with each centre on its own CPU share (cgroups; root here and in CI), or why not.
    info = res["separate-machines"]
    if info.get("not-run"):
        assert info["not-run"] in paths[1].read_text()
    else:
        assert sorted(n for n in names if separate(n)) == sorted(
            n + SEPARATE.format(cores=info["cores"])
            for n in (DEMO_LOCAL_ROW, DEMO_ROW.format(h=QUICK.demo_h), OVERLAP_ROW.format(h=QUICK.demo_h, k=k))), names
        assert "each centre on its own" in paths[1].read_text().split("## Targets")[1]
    for name in demo_rows:
        s = res["scenarios"][name]
        assert s["steps-ahead"] == (k * (QUICK.demo_rounds - 1) * QUICK.centres if " overlap " in name else 0), name
    assert res["fixed-cost"]["overhead-per-round"] > 0 and res["fixed-cost-stock"]["overhead-per-round"] > 0
    md = paths[1].read_text()
    assert "| centralised |" in md and "## Targets" in md and "Overlap: `DiLoCo H=4 overlap 2`" in md
    # Two different ratios, two names (issue 18): the table's compute share, the targets' throughput ratio.
    assert "| compute share |" in md and "throughput ratio >= 95 %" in md.split("## Targets")[1]
    assert "utilisation" not in md.lower()
