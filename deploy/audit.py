"""`bridgepool audit RUN_DIR`: the residency report, RUN_DIR/residency.json and residency.md.

Per centre it puts side by side: a fingerprint of the centre's data (the SHA-256
hashes and counts of its data manifest, never content), what its egress ledger
says it sent round by round (clients/egress.py), an independent re-check of
every ledgered message against the model's parameter manifest and the metric
allow-list, the attempts the guard blocked, and what the server recorded
receiving from it (run.json). Then a verdict, and the limits of the evidence.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from clients.egress import ALLOWED_METRICS, LEDGER_NAME, read_ledger

REPORT_FORMAT = "bridgepool-residency/1"
NO_TRAFFIC = "no traffic"  # verdict: nothing sent and nothing blocked (not a residency failure)


def audit(run_dir: Path) -> dict[str, Any]:
    """The report as a dict (what residency.json holds). Reads RUN_DIR/run.json and
    RUN_DIR/centres/NAME/{data/manifest.json, state/egress-ledger.jsonl}."""
    run_dir = Path(run_dir)
    run_path = run_dir / "run.json"
    if not run_path.exists():
        raise FileNotFoundError(f"{run_path} does not exist; is {run_dir} a bridgepool run directory?")
    run = json.loads(run_path.read_text())
    cfg = run.get("config", {})
    allowed_arrays = _allowed_arrays(str(cfg.get("model", "")))
    names = sorted(p.name for p in (run_dir / "centres").glob("*") if p.is_dir())
    names += sorted({n for r in run.get("rounds", []) for n in r.get("centres", {})} - set(names))
    centres = {n: _centre(run_dir / "centres" / n, n, run, allowed_arrays) for n in names}
    dp = _dp(run)
    verdict = _verdict([c["verdict"] for c in centres.values()])
    return {
        "format": REPORT_FORMAT, "run-dir": str(run_dir.resolve()), "run": cfg.get("run-name"),
        "status": run.get("status"), "model": cfg.get("model"), "rounds": len(run.get("rounds", [])),
        "allowed": {"arrays": {k: {"shape": list(s), "dtype": d} for k, (s, d) in allowed_arrays.items()},
                    "metrics": sorted(ALLOWED_METRICS), "records": ["arrays", "metrics", "centre"]},
        "verdict": verdict, "centres": centres, "differential-privacy": dp, "limits": limits(dp),
    }


def write_report(run_dir: Path) -> tuple[Path, Path, dict[str, Any]]:
    report = audit(run_dir)
    js, md = Path(run_dir) / "residency.json", Path(run_dir) / "residency.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(markdown(report))
    return js, md, report


RELEASES = ("worker-reply", "data-plane")  # ledger stages at which the worker lets something go


# --------------------------------------------------------------------- parts
def _allowed_arrays(model: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """What the centres' guards allow out for this run's model (the same function they use)."""
    from clients.weights import wire_manifest
    from models.gpt import build_model, parameter_manifest

    try:
        return dict(wire_manifest(parameter_manifest(build_model(model, seed=0))))
    except ValueError:  # unknown model name: nothing is allowed, so nothing can pass
        return {}


def _centre(root: Path, name: str, run: dict[str, Any], allowed: dict) -> dict[str, Any]:
    run_name = run.get("config", {}).get("run-name")
    ledger_path = root / "state" / LEDGER_NAME
    entries = [e for e in read_ledger(ledger_path) if e.get("run") == run_name]
    sent = [e for e in entries if e.get("stage") == "flower-reply" and e.get("verdict") == "sent"]
    blocked = [e for e in entries if e.get("verdict") == "blocked"]
    # The worker's own releases: its reply to the ClientApp, and (data plane) the update it sent itself.
    released = [e for e in entries if e.get("stage") in RELEASES and e.get("verdict") == "sent"]
    streamed = [e for e in released if e.get("stage") == "data-plane"]
    problems: list[str] = []
    for e in sent + released:
        problems += [f"round {e.get('round')} {e.get('op')}: {p}" for p in _recheck(e, allowed)]
    unverified = _unverified(entries)
    problems += [f"round {r} {op}: the worker released a reply whose final Flower form was never checked "
                 "(the ClientApp skipped the guard, or failed after the worker answered)" for r, op in unverified]
    server = {r["round"]: r["centres"][name].get("bytes-sent") for r in run.get("rounds", [])
              if name in r.get("centres", {})}
    ledgered = {e.get("round") for e in sent if e.get("op") == "train"}
    problems += [f"round {r}: the server recorded a reply from {name} that its ledger does not hold"
                 for r in sorted(set(server) - ledgered)]
    silent = not entries and not server  # nothing sent, nothing blocked, nothing received from it
    if not entries and not ledger_path.exists() and not silent:
        problems.append(f"no egress ledger at {ledger_path}")
    return {
        "data": _fingerprint(root / "data" / "manifest.json"),
        "ledger": str(ledger_path),
        "rounds": _per_round(sent, blocked, server),
        "sent": {"messages": len(sent), "bytes": sum(int(e.get("bytes", 0)) for e in sent),
                 "arrays": sorted({f"{a['name']} {a['dtype']} {tuple(a['shape'])}"
                                   for e in sent + streamed for a in e["arrays"]}),
                 "metrics": sorted({m for e in sent for m in e.get("metrics", [])})},
        # Model bytes the worker itself sent on the coordinator's data plane (server/dataplane.py).
        "data-plane": {"uploads": len(streamed), "bytes": sum(int(e.get("bytes", 0)) for e in streamed),
                       "destinations": sorted({str(e.get("destination")) for e in streamed})},
        "blocked": {"count": len(blocked), "rounds": sorted({e.get("round") for e in blocked}),
                    "reasons": sorted({v for e in blocked for v in e.get("violations", [])})},
        "problems": problems,
        # "no traffic": the centre sent nothing and nothing was blocked (e.g. the run failed before
        # it started): not a residency failure, and not evidence of residency either.
        "verdict": "fail" if problems else NO_TRAFFIC if silent else "pass",
    }


def _verdict(centres: list[str]) -> str:
    """The run's: "fail" if any centre's is (blocked or unaccounted egress); "no traffic" when no
    centre sent anything; else "pass"."""
    if not centres or "fail" in centres:
        return "fail"
    return NO_TRAFFIC if all(v == NO_TRAFFIC for v in centres) else "pass"


def _recheck(entry: dict[str, Any], allowed: dict) -> list[str]:
    """The guard's rules again, from the ledger alone (so a bug in the guard shows here)."""
    out = [f"record {r} is not allowed" for r in entry.get("records", [])
           if r not in ("arrays", "metrics", "centre", "upload")]
    for a in entry.get("arrays", []):
        want = allowed.get(a.get("name"))
        if want is None or (tuple(a.get("shape", ())), a.get("dtype")) != (tuple(want[0]), want[1]):
            out.append(f"array {a.get('name')} {a.get('dtype')} {a.get('shape')} is not the model's declared form")
    out += [f"metric {m} is not on the allow-list" for m in entry.get("metrics", []) if m not in ALLOWED_METRICS]
    return out


def _unverified(entries: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    """(round, op) pairs the worker released more often than the shell had checked."""
    released = Counter((e.get("round"), e.get("op")) for e in entries
                       if e.get("stage") in RELEASES and e.get("verdict") == "sent")
    # Checked: by the shell's call to the guard, or by the runtime's check against the worker's digest.
    checked = Counter((e.get("round"), e.get("op")) for e in entries
                      if e.get("stage") in ("flower-reply", "runtime"))
    return sorted(k for k, n in released.items() if checked[k] < n)


def _per_round(sent: list, blocked: list, server: dict) -> list[dict[str, Any]]:
    rounds = sorted({e.get("round") for e in sent + blocked} | set(server), key=lambda r: (r is None, r))
    return [{"round": r,
             "messages": sum(1 for e in sent if e.get("round") == r),
             "ops": sorted(e.get("op") for e in sent if e.get("round") == r),
             "bytes": sum(int(e.get("bytes", 0)) for e in sent if e.get("round") == r),
             "blocked": sum(1 for e in blocked if e.get("round") == r),
             "server-recorded-bytes": server.get(r)} for r in rounds]


def _fingerprint(manifest_path: Path) -> dict[str, Any]:
    """Counts and SHA-256 of each split; the source path and any text are left out."""
    try:
        m = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        return {"missing": str(manifest_path)}
    return {"format": m.get("format"), "tokenizer": m.get("tokenizer"), "fingerprint": m.get("fingerprint"),
            "splits": {k: {f: s.get(f) for f in ("documents", "bytes", "tokens", "sha256")}
                       for k, s in m.get("splits", {}).items()}}


def _dp(run: dict[str, Any]) -> dict[str, Any]:
    cfg = run.get("config", {})
    clip = float(cfg.get("dp-clip", 0.0) or 0.0)
    if clip <= 0:
        return {"enabled": False}
    per_round = [{"round": r["round"], "epsilon": r.get("dp", {}).get("epsilon")} for r in run.get("rounds", [])]
    return {"enabled": True, "clip": clip, "noise-multiplier": cfg.get("dp-noise-multiplier"),
            "delta": cfg.get("dp-delta"), "epsilon-per-round": per_round,
            "epsilon": per_round[-1]["epsilon"] if per_round else 0.0}


def limits(dp: dict[str, Any]) -> list[str]:
    if dp.get("enabled") and dp.get("epsilon") is not None:
        eps = dp["epsilon"]
        bound = (f"Differential privacy was on: each centre's update was clipped to L2 norm {dp['clip']} and "
                 f"Gaussian noise of multiplier {dp['noise-multiplier']} added to the average, so the published "
                 f"global models are ({eps:.3g}, {dp['delta']})-DP with respect to any one centre's whole update "
                 "(add/remove adjacency; RDP accountant). This does not cover the coordinator, which sees each "
                 "centre's update before the noise, nor which centres took part.")
    elif dp.get("enabled"):
        bound = ("Updates were clipped but no noise was added: clipping alone bounds nothing, so what the "
                 "updates reveal is unquantified.")
    else:
        bound = "Differential privacy was off: what the updates reveal about the training data is unquantified."
    return [
        "Raw data: the ledger shows every message each centre released, in form and SHA-256, and that only the "
        "model's parameter vector and allow-listed scalar metrics left; `bridgepool verify residency` captures "
        "every frame of a verification federation and searches it for planted canaries in every encoding.",
        "Model updates are not free of information: gradient inversion recovers training examples from updates "
        "(Zhu et al., NeurIPS 2019; Geiping et al., NeurIPS 2020). " + bound,
        "The guard checks the form of each message (names, shapes, dtypes, scalar types), not its values: code "
        "that hid data in the values of a parameter-shaped tensor or a metric would pass it. Hence centres run "
        "only app bundles from trusted publishers (SuperNode --trusted-entities), and the values come from the "
        "worker, the centre's installed code.",
        "The ledger is written by each centre's own installed code on its own disk: it is evidence as far as the "
        "operator controls that code and file, not a cryptographic proof.",
        "Flower's own error replies (the text of an exception when a ClientApp fails) are not in the ledger; "
        "bridgepool's error texts never quote values or unlisted names.",
        "Metadata is visible to the coordinator: which centres took part and when, message sizes, the metrics.",
    ]


# ------------------------------------------------------------------ markdown
def markdown(report: dict[str, Any]) -> str:
    centres = report["centres"]
    lines = [f"# What left each centre: run {report['run']}", "",
             f"**Verdict: {report['verdict'].upper()}**. Run status {report['status']}, model {report['model']}, "
             f"{report['rounds']} rounds recorded. Allowed out: the arrays "
             + ", ".join(f"`{k}` {v['dtype']} {tuple(v['shape'])}" for k, v in report["allowed"]["arrays"].items())
             + f" and {len(report['allowed']['metrics'])} scalar metrics "
             f"({', '.join(report['allowed']['metrics'])}), plus each centre's own name.", "",
             "| centre | data (train sha256) | messages sent | bytes sent (Flower) | bytes sent (data plane) | blocked "
             "| verdict |", "|---|---|---|---|---|---|---|"]
    for name, c in centres.items():
        sha = c["data"].get("splits", {}).get("train", {}).get("sha256") or "?"
        lines.append(f"| {name} | `{sha[:16]}…` | {c['sent']['messages']} | {c['sent']['bytes']:,} | "
                     f"{c['data-plane']['bytes']:,} | {c['blocked']['count']} | {c['verdict']} |")
    for name, c in centres.items():
        lines += ["", f"## {name}", "", "Data fingerprint (hashes and counts only):", ""]
        for split, s in c["data"].get("splits", {}).items():
            docs = f"{s['documents']} document{'' if s['documents'] == 1 else 's'}"
            lines.append(f"- {split}: {docs}, {s['tokens']:,} tokens, sha256 `{s['sha256']}`")
        dpl = c["data-plane"]
        lines += ["", f"Sent: {', '.join(c['sent']['arrays']) or 'no arrays'}; metrics "
                  f"{', '.join(c['sent']['metrics']) or 'none'}. On the data plane: {dpl['uploads']} updates, "
                  f"{dpl['bytes']:,} bytes, to {', '.join(dpl['destinations']) or 'nowhere'}.", "",
                  "| round | messages | ops | bytes (ledger) | bytes (server) | blocked |", "|---|---|---|---|---|---|"]
        for r in c["rounds"]:
            lines.append(f"| {r['round']} | {r['messages']} | {', '.join(r['ops'])} | {r['bytes']:,} | "
                         f"{'' if r['server-recorded-bytes'] is None else format(r['server-recorded-bytes'], ',')} | "
                         f"{r['blocked']} |")
        if c["blocked"]["count"]:
            lines += ["", f"Blocked attempts ({c['blocked']['count']}, nothing sent):"]
            lines += [f"- {v}" for v in c["blocked"]["reasons"]]
        if c["problems"]:
            lines += ["", "Problems:"] + [f"- {p}" for p in c["problems"]]
        lines += ["", f"Ledger: `{c['ledger']}`"]
    dp = report["differential-privacy"]
    lines += ["", "## Differential privacy", ""]
    if dp.get("enabled"):
        lines.append(f"Clip {dp['clip']}, noise multiplier {dp['noise-multiplier']}, delta {dp['delta']}.")
        lines += [f"- after round {r['round']}: epsilon "
                  f"{'unbounded' if r['epsilon'] is None else format(r['epsilon'], '.4g')}"
                  for r in dp["epsilon-per-round"]]
    else:
        lines.append("Off (config `dp-clip = 0`).")
    lines += ["", "## Limits of this evidence", ""] + [f"- {x}" for x in report["limits"]]
    return "\n".join(lines) + "\n"


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    dp = report["differential-privacy"]
    eps = dp.get("epsilon")
    privacy = ("DP off" if not dp.get("enabled") else
               f"DP epsilon {eps:.3g} at delta {dp['delta']}" if isinstance(eps, float) else "DP without noise")
    out = [f"residency verdict: {report['verdict']} ({privacy})"]
    for name, c in report["centres"].items():
        out.append(f"  {name}: {c['sent']['messages']} messages, {c['sent']['bytes']:,} bytes sent, "
                   f"{c['blocked']['count']} blocked, {c['verdict']}")
    return "\n".join(out)
