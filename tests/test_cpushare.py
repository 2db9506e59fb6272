"""The bench's per-centre CPU shares (benchmarks/cpushare.py) on cgroup trees laid out in tmp_path
as the kernel lays them out (v1 and v2), the launcher that starts a command inside one, and how
the report states the separate-machine target (or why it was not measured)."""

from __future__ import annotations

import subprocess

import pytest

from benchmarks import cpushare, report


def test_v1_groups_get_a_quota_per_period_and_take_processes(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cpushare.unavailable(tmp_path) is None
    shares = cpushare.create(["fr-genci", "de-lrz"], 0.8, root=tmp_path)
    assert set(shares.groups) == {"fr-genci", "de-lrz"}
    for group in shares.groups.values():
        assert group.parent == tmp_path / "cpu" and group.name.startswith(cpushare.PREFIX)
        assert (group / "cpu.cfs_quota_us").read_text() == "80000"
        assert (group / "cpu.cfs_period_us").read_text() == "100000"
    stale = tmp_path / "cpu" / f"{cpushare.PREFIX}999999999-fr-genci"  # a killed bench's (no such pid)
    stale.mkdir()
    cpushare.create(["x"], 0.5, root=tmp_path)
    assert not stale.exists() and all(g.exists() for g in shares.groups.values())  # live ones stay
    cpushare.join(shares.groups["de-lrz"], pid=4242)
    assert (shares.groups["de-lrz"] / "cgroup.procs").read_text() == "4242"


def test_v2_enables_the_cpu_controller_for_children_and_writes_cpu_max(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    shares = cpushare.create(["a"], 1.0, root=tmp_path)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"
    assert (shares.groups["a"] / "cpu.max").read_text() == "100000 100000"
    for f in shares.groups["a"].iterdir():  # a real cgroup's files go with the directory; here, by hand
        f.unlink()
    shares.remove()
    assert not shares.groups["a"].exists()


def test_why_not_is_named(tmp_path):
    assert "no cgroup cpu controller" in cpushare.unavailable(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    assert "cpu controller is not enabled" in cpushare.unavailable(tmp_path)
    with pytest.raises(RuntimeError, match="cpu controller is not enabled"):
        cpushare.create(["a"], 0.5, root=tmp_path)
    with pytest.raises(ValueError, match="must be > 0 cores"):
        cpushare.create(["a"], 0.0, root=tmp_path)


def test_a_command_joins_its_group_then_runs_as_itself(tmp_path):
    group = tmp_path / "g"
    group.mkdir()
    out = subprocess.run(cpushare.in_group(group, ["sh", "-c", 'echo "$$ $1"', "sh", "two words"]),
                         capture_output=True, text=True, check=True)
    pid, arg = out.stdout.strip().split(" ", 1)
    assert arg == "two words"  # arguments pass through untouched
    assert (group / "cgroup.procs").read_text().strip() == pid  # exec kept the pid the group was given


def test_the_report_says_why_the_separate_rows_were_not_run():
    res = {"separate-machines": {"cores": 0.8, "not-run": "no cgroup cpu controller under /x"}}
    (what, measured, verdict), = report._separate_target(res, {})
    assert verdict == "not measured" and "no cgroup cpu controller under /x" in measured
    assert "not run here: no cgroup cpu controller under /x" in " ".join(report._separate_lines(res))
    assert report._separate_target({"separate-machines": None}, {}) == []  # a plan without demo rows


def test_the_separate_verdict_is_the_demo_defaults_against_its_capped_loop():
    tail = report.SEPARATE.format(cores=0.8)
    demo, overlap = f"DiLoCo H=80 (demo default){tail}", f"DiLoCo H=80 overlap 16{tail}"
    res = {"separate-machines": {"cores": 0.8}}
    sc = {report.DEMO_LOCAL_ROW + tail: {"tokens-per-second": 100.0}, "DiLoCo H=80 (demo default)": {
        "tokens-per-second": 99.0}, demo: {"tokens-per-second": 96.0}, overlap: {"tokens-per-second": 90.0}}
    (_, measured, verdict), = report._separate_target(res, sc)
    assert verdict == "met" and "96.0 % (DiLoCo H=80 (demo default))" in measured and "90.0 %" in measured
    sc[demo], sc[overlap] = {"tokens-per-second": 90.0}, {"tokens-per-second": 96.0}
    assert report._separate_target(res, sc)[0][2] == "missed"  # overlap is optional; the target is the default's
