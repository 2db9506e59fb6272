"""Smoke test of the pooling benchmark (`bridgepool bench --pooling --quick`): every centre's solo
model and the pooled one, each scored on every centre's held-out split; outputs and figures consistent."""

from __future__ import annotations

import json
import math

from benchmarks.federation import main as bench_main
from benchmarks.pooling import POOLED, QUICK, solo_name


def test_pooling_bench_scores_every_model_on_every_centre(tmp_path):
    assert bench_main(["--pooling", "--quick", "--out", str(tmp_path), "--tag", "smoke"]) == 0
    res = json.loads((tmp_path / "smoke.json").read_text())
    centres = list(res["train-tokens"])
    assert len(centres) == QUICK.centres and len(res["budgets"]) == len(QUICK.budgets)
    for b in res["budgets"]:
        assert set(b["matrix"]) == {POOLED, *(solo_name(c) for c in centres)}
        for row in b["matrix"].values():
            assert set(row) == set(centres) and all(math.isfinite(v) and 2.0 < v < 6.0 for v in row.values())
        # The pooled row is the federation's own final model: its scores are the run's own evaluation.
        for c in centres:
            assert abs(b["matrix"][POOLED][c] - b["pooled"]["eval-in-run"][c]) < 1e-4, (c, b)
            assert b["solo"][c]["compute"] > 0 and b["epochs"][c] > 0
        # Solo models differ from each other: each saw only its own centre's data.
        solos = [b["matrix"][solo_name(c)] for c in centres]
        assert solos[0] != solos[1]
    md = (tmp_path / "smoke.md").read_text()
    for c in centres:
        assert f"- {c}: held-out loss " in md and " pooled against " in md
    assert "## Reading it" in md and "![cross-evaluation heat map](smoke_heatmap.png)" in md
    assert (tmp_path / "smoke_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
