"""Soak: many short rounds on a real local federation; does anything grow or leak?

    python -m benchmarks.soak                               # 200 rounds, 2 centres, tiny model, H = 1
    python -m benchmarks.soak --rounds 30 --out benchmarks/results/soak_cpu-2core_2026-11-22.md

Reports the resident memory (VmRSS) and open file descriptors of the SuperLink and
of the ServerApp at start, after warm-up and at the end, the SuperLink database
size, and after shutdown any process of the federation still alive and any new
entry in /tmp or /dev/shm. Not run in CI (minutes to an hour).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import flwr
import torch

from clients.data import DEFAULT_CENTRES, prepare_centre
from deploy.local import LocalFederation, centre_dirs
from deploy.processes import descendants, free_base_port
from models.config import RunConfig, load_defaults

CORPUS_BYTES = 80_000  # per centre: plenty for H = 1 rounds


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def descendant_running(root: int, marker: bytes) -> int | None:
    """A process below `root` whose command line contains `marker`, e.g. the ServerApp a
    SuperLink started (b"flwr-serverapp") or a centre's warm runtime (b"clients.runtime")."""
    for pid in descendants([root]):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def serverapp_pid(superlink_pid: int) -> int | None:
    return descendant_running(superlink_pid, b"flwr-serverapp")


def sample(label: str, rnd: int, superlink: int, db: Path, centre: dict[str, int] | None = None) -> dict:
    """`centre`: one centre's long-lived processes (SuperNode, worker) by role -> pid."""
    app = serverapp_pid(superlink)
    centre = centre or {}
    runtime = descendant_running(centre["supernode"], b"clients.runtime") if "supernode" in centre else None
    rss = {f"{role}-rss-mib": rss_kib(pid) / 1024 for role, pid in
           {**centre, **({"runtime": runtime} if runtime else {})}.items()}
    return {"when": label, "round": rnd, **rss, "superlink-rss-mib": rss_kib(superlink) / 1024,
            "superlink-fds": open_fds(superlink),
            "serverapp-rss-mib": rss_kib(app) / 1024 if app else float("nan"),
            "serverapp-fds": open_fds(app) if app else 0,
            "db-mib": db.stat().st_size / 2**20 if db.exists() else 0.0}


def soak(rounds: int, centres_n: int, run_dir: Path, warmup: int) -> dict:
    centres = [centre_dirs(run_dir, name) for name, _ in DEFAULT_CENTRES[:centres_n]]
    for c, (_, source) in zip(centres, DEFAULT_CENTRES, strict=False):
        if not (c.data_dir / "manifest.json").exists():
            prepare_centre(source, c.data_dir, max_bytes=CORPUS_BYTES)
    cfg = RunConfig.from_mapping({**load_defaults(), "model": "tiny", "rounds": rounds, "inner-steps": 1,
                                  "batch-size": 4, "eval-batches": 1, "inner-warmup-steps": 1, "threads": 1,
                                  "expected-centres": centres_n, "round-timeout": 120.0,
                                  "run-dir": str(run_dir), "run-name": "soak"})
    tmp_before = set(os.listdir("/tmp")) | {f"shm:{n}" for n in os.listdir("/dev/shm")}
    samples, seen = [], set()
    t0 = time.monotonic()
    with LocalFederation(run_dir, centres, base_port=free_base_port(2 + centres_n)) as fed:
        superlink = next(p.popen.pid for p in fed.group.procs if p.name == "SuperLink")
        db = run_dir / "server" / "superlink.db"  # absent with the in-memory SuperLink (the default)
        first = centres[0].name
        centre = {role: next(p.popen.pid for p in fed.group.procs if p.name == f"{name} {first}")
                  for role, name in (("supernode", "SuperNode"), ("worker", "worker"))}
        samples.append(sample("start (idle SuperLink)", 0, superlink, db, centre))

        def tick(run: dict) -> None:
            done = run["rounds"][-1]["round"] if run.get("rounds") else 0
            for mark, label in ((1, "after round 1"), (warmup, "after warm-up"), (rounds, "end")):
                if done >= mark and mark not in seen and serverapp_pid(superlink):
                    seen.add(mark)
                    samples.append(sample(label, done, superlink, db, centre))
            if done and done % 25 == 0 and done not in seen:
                seen.add(done)
                samples.append(sample("periodic", done, superlink, db, centre))

        run = fed.wait(fed.submit(cfg.to_mapping()), on_tick=tick, timeout=24 * 3600)
        tree = descendants([p.popen.pid for p in fed.group.procs]) | {p.popen.pid for p in fed.group.procs}
    wall = time.monotonic() - t0
    time.sleep(1.0)
    leaked_procs = sorted(pid for pid in tree if Path(f"/proc/{pid}").exists())
    tmp_after = set(os.listdir("/tmp")) | {f"shm:{n}" for n in os.listdir("/dev/shm")}
    walls = [r["wall-seconds"] for r in run.get("rounds", [])]
    return {"run": run, "samples": samples, "wall": wall, "leaked-processes": leaked_procs,
            "new-tmp-entries": sorted(tmp_after - tmp_before), "round-walls": walls, "config": cfg}


def report(result: dict, command: str) -> str:
    s = sorted(result["samples"], key=lambda x: x["round"])
    warm = next((x for x in s if x["when"] == "after warm-up"), s[0])
    end = next((x for x in s if x["when"] == "end"), s[-1])

    def growth(key: str) -> str:
        return f"{100 * (end[key] - warm[key]) / warm[key]:+.1f} %" if warm.get(key) and key in end else "n/a"

    walls = result["round-walls"]
    run = result["run"]
    lines = [
        "# Soak: many short rounds on a local Deployment Engine federation", "",
        f"Command: `{command}`", "",
        f"- flwr {flwr.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with other work: wall times are indicative",
        f"- {result['config'].rounds} rounds, {result['config'].expected_centres} centres, tiny model, inner-steps 1; "
        f"status **{run.get('status')}**, {len(walls)} rounds recorded, {result['wall']:.0f} s in all",
        f"- round wall time: mean {sum(walls) / max(1, len(walls)):.2f} s, min {min(walls, default=0):.2f} s, "
        f"max {max(walls, default=0):.2f} s",
        "",
        "| when | round | SuperLink RSS MiB | SuperLink fds | ServerApp RSS MiB | ServerApp fds | superlink.db MiB "
        "| centre SuperNode / runtime / worker RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {x['when']} | {x['round']} | {x['superlink-rss-mib']:.1f} | {x['superlink-fds']} | "
          f"{x['serverapp-rss-mib']:.1f} | {x['serverapp-fds']} | {x['db-mib']:.2f} | "
          + " / ".join(f"{x.get(f'{role}-rss-mib', 0):.1f}" for role in ("supernode", "runtime", "worker")) + " |"
          for x in s],
        "",
        f"Growth after warm-up (round {warm['round']} -> {end['round']}): "
        f"SuperLink RSS {growth('superlink-rss-mib')}, ServerApp RSS {growth('serverapp-rss-mib')}, "
        f"centre SuperNode {growth('supernode-rss-mib')}, warm ClientApp runtime {growth('runtime-rss-mib')}, "
        f"worker {growth('worker-rss-mib')}; "
        f"SuperLink fds {warm['superlink-fds']} -> {end['superlink-fds']}, "
        f"ServerApp fds {warm['serverapp-fds']} -> {end['serverapp-fds']}.",
        "",
        f"After shutdown: leaked processes {result['leaked-processes'] or 'none'}; "
        f"new entries in /tmp or /dev/shm {result['new-tmp-entries'] or 'none'} "
        "(other programs on the machine may add entries there too).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--centres", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0, help="round after which growth is measured (default rounds/10)")
    p.add_argument("--run-dir", type=Path, help="default: a temporary directory")
    p.add_argument("--out", type=Path, help="write the markdown report here too")
    args = p.parse_args(argv)
    warmup = args.warmup or max(2, args.rounds // 10)
    command = "python -m benchmarks.soak " + " ".join(argv if argv is not None else os.sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bridgepool-soak-") as tmp:
        result = soak(args.rounds, args.centres, (args.run_dir or Path(tmp) / "run").resolve(), warmup)
    text = report(result, command.strip())
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if result["run"].get("status") == "finished" else 1


if __name__ == "__main__":
    raise SystemExit(main())
