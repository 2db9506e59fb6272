"""Plots and the summary table, read from RUN_DIR/run.json only.

`loss.png`: held-out (federated evaluation) loss of the global model and each
centre's training loss, against the tokens that centre has trained on.
`throughput.png`: tokens/s per centre, utilisation, each centre's inner steps (solid) and
idle seconds (dotted, waiting for the others) per round, and bytes per round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def load_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a bridgepool run directory?")
    return json.loads(path.read_text())


def centre_series(run: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per centre: cumulative tokens, train loss, eval loss (of the model it started the
    round from, so at the tokens seen *before* that round) and tokens/s, round by round."""
    out: dict[str, dict[str, list[float]]] = {}
    for rec in run.get("rounds", []):
        for name, m in rec["centres"].items():
            s = out.setdefault(name, {k: [] for k in ("round", "tokens", "train", "eval_tokens",
                                                      "eval", "tps", "util", "steps", "idle")})
            before = s["tokens"][-1] if s["tokens"] else 0.0
            s["round"].append(rec["round"])
            s["eval_tokens"].append(before)
            s["eval"].append(m.get("eval-loss", float("nan")))
            s["tokens"].append(before + m.get("tokens", 0.0))
            s["train"].append(m.get("train-loss", float("nan")))
            s["tps"].append(m.get("tokens-per-second", 0.0))
            s["util"].append(m.get("compute-seconds", 0.0) / max(rec["wall-seconds"], 1e-9))
            s["steps"].append(rec.get("inner-steps", {}).get(name, m.get("inner-steps", float("nan"))))
            s["idle"].append(rec.get("idle-seconds", {}).get(name, float("nan")))
    for name, m in run.get("final", {}).get("centres", {}).items():
        if name in out:
            out[name]["eval_tokens"].append(out[name]["tokens"][-1])
            out[name]["eval"].append(m.get("eval-loss", float("nan")))
    return out


def plot_run(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    series = centre_series(run)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in series.items():
        line, = ax.plot(s["eval_tokens"], s["eval"], marker="o", label=f"{name} held-out")
        ax.plot(s["tokens"], s["train"], linestyle="--", color=line.get_color(), alpha=0.6,
                label=f"{name} train")
    ax.set_xlabel("tokens trained by the centre")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(f"bridgepool {run['config'].get('strategy')} · {run['config'].get('model')} model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    loss_png = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)

    rounds = run.get("rounds", [])
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    idle_axis = axes[2].twinx()
    for name, s in series.items():
        line, = axes[0].plot(s["round"], s["tps"], marker="o", label=name)
        axes[1].plot(s["round"], [100 * u for u in s["util"]], marker="o", label=name)
        axes[2].plot(s["round"], s["steps"], marker="o", color=line.get_color(), label=name)
        idle_axis.plot(s["round"], s["idle"], linestyle=":", marker="x", color=line.get_color())
    axes[0].set_title("training tokens/s per centre")
    axes[1].set_title("utilisation: compute / round wall time (%)")
    axes[2].set_title("inner steps (solid), idle s (dotted)")
    idle_axis.set_ylabel("idle seconds (waiting)")
    axes[3].bar([r["round"] for r in rounds], [(r["bytes-sent"] + r["bytes-received"]) / 2**20
                                                for r in rounds])
    axes[3].set_title("MiB exchanged per round")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tput_png = run_dir / "throughput.png"
    fig.savefig(tput_png, dpi=110)
    plt.close(fig)
    return [loss_png, tput_png]


def summary_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per centre: first and final held-out loss, mean tokens/s, tokens."""
    rows = []
    for name, s in centre_series(run).items():
        rows.append({
            "centre": name,
            "eval-loss-first": s["eval"][0] if s["eval"] else float("nan"),
            "eval-loss-final": s["eval"][-1] if s["eval"] else float("nan"),
            "train-loss-last": s["train"][-1] if s["train"] else float("nan"),
            "tokens": s["tokens"][-1] if s["tokens"] else 0.0,
            "tokens-per-second": sum(s["tps"]) / len(s["tps"]) if s["tps"] else 0.0,
        })
    return rows
