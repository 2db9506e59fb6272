"""Benchmark outputs: JSON, a Markdown table with the targets, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The bare loop run for the demo's own rounds and H: the reference for the demo rows' throughput ratio.
DEMO_LOCAL_ROW = "local loop (demo's rounds and H)"
# Appended to a row run with each centre in a CPU share of its own (benchmarks/cpushare.py).
SEPARATE = ", each centre on its own {cores:g} core"


def separate(name: str) -> bool:
    """A row run with each centre on its own CPU share (emulated separate machines)."""
    return SEPARATE.split("{")[0] in name


def figures(s: dict[str, Any]) -> dict[str, float]:
    """Derived figures for one scenario (all from measured wall/compute/bytes)."""
    evals = list(s.get("eval", {}).values())
    return {
        "tokens": s["tokens"],
        "wall": s["wall"],
        # Training-time rate: round wall time for Flower, training time for the baselines.
        "tokens-per-second": s["tokens"] / s.get("round-wall", s["wall"]),
        # Compute share: the fraction of round wall time a centre spent training (the table's column).
        # Not the throughput ratio of the targets (federated tokens/s over the bare loop's).
        "compute-share": min(1.0, s["compute"] / s.get("round-wall", s["wall"])),
        "bytes": s["bytes"],
        "bytes-per-round": s["bytes"] / max(1, s.get("rounds", 1)),
        "bytes-per-token": s["bytes"] / s["tokens"],
        "overhead-per-round": s.get("overhead-per-round", 0.0),
        "eval-mean": sum(evals) / len(evals) if evals else float("nan"),
    }


def targets(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    sc = {k: figures(v) for k, v in res["scenarios"].items()}
    central, ddp, local = sc["centralised"], sc["all-reduce (DDP gloo)"], sc["local loop (no federation)"]
    dilocos = {k: v for k, v in sc.items() if k.startswith("DiLoCo H=") and k.split("=")[1].isdigit()}  # fp32
    demo, others = _demo_rows(sc)
    best = demo or max(dilocos, key=lambda k: int(k.split("=")[1]))
    fixed = res["fixed-cost"]["overhead-per-round"]
    # The demo rows against the bare loop run for the demo's own rounds and H, when the plan has one.
    ref = sc.get(DEMO_LOCAL_ROW, local) if demo else local
    rows = [
        ("throughput ratio >= 95 % for the demo's default configuration (federated tok/s / local loop tok/s, "
         "same rounds and H)",
         "; ".join(f"{100 * sc[k]['tokens-per-second'] / ref['tokens-per-second']:.1f} % ({k})"
                   for k in [best, *others]),
         _ok(sc[best]["tokens-per-second"] >= 0.95 * ref["tokens-per-second"])),
        *_separate_target(res, sc),
        ("fixed overhead per round <= 1.5 s (2 centres)", f"{fixed:.2f} s", _ok(fixed <= 1.5)),
        ("federated held-out loss within 5 % of centralised at equal tokens",
         ", ".join(f"{k}: {100 * (v['eval-mean'] / central['eval-mean'] - 1):+.1f} %" for k, v in dilocos.items()),
         _ok(min(v["eval-mean"] for v in dilocos.values()) <= 1.05 * central["eval-mean"])),
    ]
    for k, v in ((k, v) for k, v in sc.items() if k in dilocos or (k.startswith("DiLoCo") and k.endswith(" int8"))):
        h = int(k.split("=")[1].split()[0])
        ratio = ddp["bytes-per-token"] / max(v["bytes-per-token"], 1e-12)
        rows.append((f"{k}: bytes/token <= 1/H of DDP's", f"{ratio:.0f}x less than DDP",
                     _ok(v["bytes-per-token"] <= ddp["bytes-per-token"] / h)))
    for k, v in sc.items():
        if k.endswith(" int8"):
            fp32 = sc[fp32_name(k)]
            # Both directions: int8 pseudo-gradients up, int8 deltas of the global model down.
            ratio = v["bytes"] / max(1, fp32["bytes"])
            dloss = v["eval-mean"] / fp32["eval-mean"] - 1
            rows.append((f"{k}: total bytes (both directions) <= 0.26 x fp32, held-out loss within 1 %",
                         f"{ratio:.3f} x bytes, loss {100 * dloss:+.2f} %", _ok(ratio <= 0.26 and abs(dloss) <= 0.01)))
    return rows


def _separate_target(res: dict[str, Any], sc: dict[str, dict[str, float]]) -> list[tuple[str, str, str]]:
    """The throughput-ratio target again, with each centre on its own CPU share and the coordinator
    outside them (separate machines, emulated), against the same centres' loop on the same shares."""
    info = res.get("separate-machines")
    if not info:
        return []
    what = (f"throughput ratio >= 95 %, each centre on its own {info['cores']:g} core, the coordinator outside "
            "(separate machines, emulated with cgroups)")
    ref_name = DEMO_LOCAL_ROW + SEPARATE.format(cores=info["cores"])
    ref = sc.get(ref_name)
    rows = [k for k in sc if separate(k) and k != ref_name]
    if info.get("not-run") or ref is None or not rows:
        return [(what, f"not measured: {info.get('not-run', 'no rows')}", "not measured")]
    ratios = {k: sc[k]["tokens-per-second"] / ref["tokens-per-second"] for k in rows}
    demo = next((k for k in ratios if "(demo default)" in k), max(ratios, key=ratios.__getitem__))
    return [(what, "; ".join(f"{100 * v:.1f} % ({k.split(',')[0]})" for k, v in ratios.items()),
             _ok(ratios[demo] >= 0.95))]


def _separate_lines(res: dict[str, Any]) -> list[str]:
    info = res.get("separate-machines")
    if not info:
        return []
    if info.get("not-run"):
        return [f"Separate machines (emulated): not run here: {info['not-run']}.", ""]
    return [f"Separate machines (emulated): the rows ending `{SEPARATE.format(cores=info['cores'])}` ran each "
            f"centre's processes (worker, SuperNode, ClientApp runtime; or its bare local loop) in a cgroup capped "
            f"at {info['cores']:g} CPU, with the coordinator (SuperLink, ServerApp) outside, on the rest of the "
            "machine, as when every centre and the coordinator have hardware of their own. The reference is the same "
            "centres' local loop on the same caps. The other rows share all cores, so they also charge the "
            "coordinator's CPU to the centres. Those rows are left out of the plots: their losses are their "
            "uncapped twins'.", ""]


def _demo_rows(sc: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The demo's default row (None when the plan has none) and its variants with overlap (and int8)."""
    rows = [k for k in sc if not separate(k)]
    return next((k for k in rows if k.endswith("(demo default)")), None), [k for k in rows if " overlap " in k]


def _overlap_lines(res: dict[str, Any]) -> list[str]:
    """What overlap-steps buys: the demo's default row against the same run with overlap."""
    sc = res["scenarios"]
    demo, others = _demo_rows(sc)
    with_overlap = next((k for k in others if not k.endswith(" int8")), None)
    if demo is None or with_overlap is None:
        return []
    on, off = figures(sc[with_overlap]), figures(sc[demo])
    k = sc[with_overlap].get("overlap-steps", "?")
    return [f"Overlap: `{with_overlap}` trains each round's first {k} inner steps on the centre's own model while "
            f"the server aggregates, then adds them onto the new global model. Against `{demo}`: "
            f"{on['tokens-per-second']:,.0f} vs {off['tokens-per-second']:,.0f} tokens/s, "
            f"compute share {100 * on['compute-share']:.0f} % vs {100 * off['compute-share']:.0f} %, held-out loss "
            f"{on['eval-mean']:.3f} vs {off['eval-mean']:.3f} "
            f"({100 * (on['eval-mean'] / off['eval-mean'] - 1):+.2f} %).", ""]


def _steady(s: dict[str, Any]) -> str:
    return f" ({s['overhead-steady']:.2f} s after round 1)." if s.get("overhead-steady") is not None else "."


def fp32_name(int8_name: str) -> str:
    return int8_name.removesuffix(" int8")


def _ok(flag: bool) -> str:
    return "met" if flag else "missed"


def write_outputs(res: dict[str, Any], out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}_loss.png", out / f"{stem}_bytes.png"]
    paths[0].write_text(json.dumps(res, indent=1, default=str))
    paths[1].write_text(markdown(res, stem))
    _plots(res, paths[2], paths[3])
    return paths


def markdown(res: dict[str, Any], stem: str) -> str:
    env, plan = res["environment"], res["plan"]
    lines = [f"# {stem}", "",
             f"Model `{plan['model']}`, {plan['centres']} centres, {plan['steps']} inner steps per centre "
             f"(same tokens in every scenario), H in {plan['hs']}. Python {env['python']}, torch {env['torch']}, "
             f"flwr {env['flwr']}, {env['cores']} cores ({env['cpu']}), {env['date']}.", "",
             "Two ratios, not to be confused: **compute share** (table) is a centre's training time over the "
             "round's wall time; **throughput ratio** (targets) is federated tokens/s over the bare local "
             "loop's tokens/s on the same cores.", "",
             "| scenario | tokens | wall s | tokens/s | compute share | bytes total | bytes/round | bytes/token "
             "| overhead/round s | held-out loss (per centre) | mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in res["scenarios"].items():
        f = figures(s)
        per = ", ".join(f"{k} {v:.3f}" for k, v in s.get("eval", {}).items()) or "-"
        lines.append(f"| {name} | {f['tokens']:,.0f} | {f['wall']:.1f} | {f['tokens-per-second']:,.0f} | "
                     f"{100 * f['compute-share']:.0f} % | {f['bytes']:,.0f} | {f['bytes-per-round']:,.0f} | "
                     f"{f['bytes-per-token']:.1f} | {f['overhead-per-round']:.2f} | {per} | {f['eval-mean']:.3f} |")
    fixed, stock = res["fixed-cost"], res.get("fixed-cost-stock")
    lines += ["", f"Fixed cost: tiny model, 1 inner step, {fixed['rounds']} rounds: "
              f"{fixed['overhead-per-round']:.2f} s per round of wall time not spent computing"
              f"{_steady(fixed)}"
              + (f" Stock `flower-supernode` (a new ClientApp process per message, Flower's 3 s idle pull), "
                 f"same run: {stock['overhead-per-round']:.2f} s{_steady(stock)}" if stock else ""), ""]
    for name, s in res["scenarios"].items():
        if s.get("dp"):
            dp = s["dp"]
            eps = f"{dp['epsilon']:.2f}" if dp.get("epsilon") is not None else "unbounded"
            lines += [f"{name}: centre-level DP, clip {dp['clip']:g}, noise multiplier {dp['noise-multiplier']:g}, "
                      f"epsilon {eps} at delta {dp['delta']:g} after {dp['rounds']} rounds; noise std on the mean "
                      f"update {dp['noise-std']:g} per coordinate.", ""]
    lines += _overlap_lines(res)
    lines += _separate_lines(res)
    lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(res)]
    lines += ["", "Bytes are measured: Flower rows are the traffic the SuperLink counted on its Fleet API "
              "(centres <-> coordinator, HTTP payloads, from `flwr ls`); the DDP row is the loopback of a network "
              "namespace holding only the DDP processes (TCP/IP framing included).", ""]
    return "\n".join(lines)


def _plots(res: dict[str, Any], loss_png: Path, bytes_png: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    # One axis range for the rows that learn: a row whose loss explodes (DP's noise with two
    # centres) would flatten every other curve to a line; it is drawn, clipped, and says so.
    sane = [loss for s in res["scenarios"].values() if not s.get("dp") for _, loss, _ in s.get("curve", [])]
    top, bottom = (1.1 * max(sane), 0.9 * min(sane)) if sane else (None, None)
    for name, s in res["scenarios"].items():
        if separate(name):  # the same run as its row without the share (same losses), only slower or not
            continue
        if "curve" in s:
            toks, loss, t = zip(*s["curve"], strict=True)
            label = f"{name} (off scale: final {loss[-1]:,.0f})" if top and max(loss) > top else name
            axes[0].plot(toks, loss, marker="o", label=label)
            axes[1].plot(t, loss, marker="o", label=label)
        elif s.get("eval"):
            mean = sum(s["eval"].values()) / len(s["eval"])
            axes[0].axhline(mean, linestyle="--", alpha=0.6, label=f"{name} (final)")
            axes[1].axhline(mean, linestyle="--", alpha=0.6, label=f"{name} (final)")
    axes[0].set_xlabel("tokens (all centres)")
    axes[1].set_xlabel("seconds since start")
    for ax in axes:
        ax.set_ylabel("held-out loss (mean over centres)")
        ax.grid(alpha=0.3)
        if top:
            ax.set_ylim(bottom, top)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [n for n in res["scenarios"] if not separate(n)]
    ax.barh(names, [max(1, res["scenarios"][n]["bytes"]) for n in names])
    ax.set_xscale("log")
    ax.set_xlabel("bytes exchanged, measured (log)")
    fig.tight_layout()
    fig.savefig(bytes_png, dpi=110)
    plt.close(fig)
