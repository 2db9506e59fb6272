"""The evidence bundle of `bridgepool verify residency`: report.json, report.md, report.html.

Integrity: the SHA-256 of the code (every tracked source file of the installed tree, and the git
commit when there is one), of the app bundle exactly as `flwr run` builds it (Flower's own FAB
builder; its hash is checked against the one the SuperLink reports for the run, `flwr ls`), of the run
config, of each capture file and of the TLS key log. The HTML page is one self-contained file
(inline CSS, no script, nothing fetched), for a reader without the tools.
"""

from __future__ import annotations

import hashlib
import html
import json
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from models.config import APP_DIR


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def code_digest(root: Path = APP_DIR) -> dict[str, Any]:
    """SHA-256 over (path, SHA-256) of every source file of the product (the app directory's
    packages, pyproject.toml), sorted: the same tree gives the same digest on any machine."""
    files = sorted(p for pkg in ("server", "clients", "models", "deploy", "benchmarks")
                   for p in (root / pkg).rglob("*") if p.is_file() and p.suffix in (".py", ".toml", ".sh", ".yml"))
    files.append(root / "pyproject.toml")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root)}\0{sha256_file(p)}\n".encode())
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {"sha256": h.hexdigest(), "files": len(files),
            "git-commit": git.stdout.strip() if git.returncode == 0 else None,
            "git-dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def integrity(out: Path, cfg: Any, app: Path, recorded: list[str], captures: dict[str, Any],
              keylog: Path | None) -> dict[str, Any]:
    """`recorded`: the FAB hash of each run the SuperLink held (`flwr ls`); the one run here."""
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(Path(app))
    (out / "app.fab").write_bytes(fab)
    fab_sha = hashlib.sha256(fab).hexdigest()
    config = json.dumps(cfg.to_mapping(), sort_keys=True).encode()
    return {
        "versions": _versions(),
        "code": code_digest(),
        "app-bundle": {"path": str(out / "app.fab"), "sha256": fab_sha, "bytes": len(fab),
                       "superlink-recorded-sha256": recorded[-1] if recorded else None,
                       "matches-run": recorded == [fab_sha] if recorded else None},
        "config": {"sha256": hashlib.sha256(config).hexdigest(), "canonical-json": config.decode()},
        "captures": {name: {"path": str(c.pcap), "sha256": sha256_file(c.pcap)} for name, c in captures.items()},
        "tls-key-log": {"path": str(keylog), "sha256": sha256_file(keylog)} if keylog and Path(keylog).exists()
        else None,
    }


def _versions() -> dict[str, Any]:
    import flwr
    import torch

    def tool(argv: list[str]) -> str | None:
        if shutil.which(argv[0]) is None:
            return None
        done = subprocess.run(argv, capture_output=True, text=True)
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else None

    return {"python": platform.python_version(), "flwr": flwr.__version__, "torch": torch.__version__,
            "platform": platform.platform(), "tcpdump": tool(["tcpdump", "--version"]),
            "tshark": tool(["tshark", "--version"])}


def limits(dp: dict[str, Any] | None) -> list[str]:
    """What this evidence shows and what it cannot (shared/notes/anchors.md: what can honestly be claimed)."""
    if dp and dp.get("epsilon") is not None:
        bound = (f"Differential privacy was on (clip {dp.get('clip')}, noise multiplier {dp.get('noise-multiplier')}): "
                 f"epsilon {dp['epsilon']:.3g} at delta {dp.get('delta')} for the published models, with respect to "
                 "any one centre's whole update; the coordinator sees each update before the noise.")
    else:
        bound = "Differential privacy was off in this run: what the updates reveal about the data is unquantified."
    return [
        "Shown: during this run no planted canary crossed any centre's link, in any encoding searched, and none is "
        "in the coordinator's files (SuperLink database, checkpoints, run records, logs).",
        "Raw data is not the only thing that travels: the centres send model updates, and updates are not data "
        "but are not free of information either. Gradient inversion recovers training examples from updates "
        "(Zhu et al., NeurIPS 2019; Geiping et al., NeurIPS 2020). " + bound,
        "The proof covers this code, this app bundle and this config (their SHA-256 above), on a throwaway "
        "verification federation with the same processes and command lines as a deployment; it says nothing about "
        "other code, nor about a deployment's own network outside the centres' links.",
        "A canary is found only in an encoding the search knows (listed above); data transformed otherwise (for "
        "example encrypted by hostile app code) would not be. Hence centres run only app bundles from trusted "
        "publishers, and the guard checks the form of every message (`bridgepool audit`).",
        "Loopback topology: all centres share one interface, TLS is off, and the per-centre check of who talked "
        "to whom is not made; the netns topology (root) makes it.",
    ]


# ------------------------------------------------------------------ writing
def write(out: Path, report: dict[str, Any]) -> list[Path]:
    paths = [out / "report.json", out / "report.md", out / "report.html"]
    report = {**report, "files": {"reports": [str(p) for p in paths]}}
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(report))
    paths[2].write_text(page(report))
    return paths


def sections(r: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows) tables: one source for the Markdown and the HTML."""
    integ = r["integrity"]
    out = [("Run", ["what", "value"], [
        ["verdict", f"{r['verdict']}: {r['verdict-reason']}"], ["method", f"{r['method']} ({r['method-reason']})"],
        ["re-run with", r["command"]],
        ["run", f"{r['run']['name']}: {r['run']['status']}, {r['run']['rounds']} rounds"],
        ["centres", ", ".join(r["centres"])],
        ["egress guard (bridgepool audit)", r["guard"]["verdict"] if r.get("guard") else "no run record"],
        ["leak probe", f"sent from {r['probe']['from']}: {r['probe']['log']}" if r["probe"]["sent"] else "not sent"]])]
    out.append(("Canaries planted", ["centre", "canary", "source", "source documents", "canary documents"],
                [[c, r["canaries"][c], p["source"], str(p["source-documents"]), str(p["canary-documents"])]
                 for c, p in r["planted"].items()]))
    out.append(("Links captured", ["link", "interface", "frames", "bytes", "dropped", "tcpdump recount",
                                   "to the coordinator (SuperLink / data plane frames)", "strays", "TLS connections "
                                   "decrypted"],
                [[n, lk["interface"], f"{lk['frames']:,}", f"{lk['bytes']:,}", str(lk["dropped"]),
                  str(lk["tcpdump-recount"]),
                  " / ".join(str(v) for v in lk.get("to-coordinator-frames", {}).values()) or "n/a (loopback)",
                  str(len(lk["strays"])) if "strays" in lk else "n/a (loopback)",
                  str(lk.get("connections-decrypted", "n/a (no TLS)"))] for n, lk in r["links"].items()]))
    cap, files = r["searches"]["capture"], r["searches"]["coordinator-files"]
    out.append(("Searches", ["searched", "size", "hits"], [
        [f"capture: {cap['haystacks']} haystacks (raw frames, TCP/TLS streams, HTTP bodies, inflated streams)",
         f"{cap['bytes']:,} bytes", _hits(cap["hits"])],
        [f"coordinator files: {len(files['files'])} (SuperLink database, checkpoints, run.json, logs)",
         f"{sum(files['files'].values()):,} bytes", _hits(files["hits"])],
        ["encodings", ", ".join(r["encodings"]), ""],
        ["content-encodings seen", ", ".join(r["content-encodings"]) or "none", ""]]))
    out.append(("Public markers (must be found: the search sees the traffic)", ["marker", "found on"],
                [[k, ", ".join(m["found-in"]) or "NOT FOUND"] for k, m in r["markers"].items()]))
    if r["problems"]:
        out.append(("Problems", ["problem"], [[p] for p in r["problems"]]))
    fab = integ["app-bundle"]
    out.append(("Integrity (SHA-256)", ["item", "sha256", "detail"], [
        ["code", integ["code"]["sha256"], f"{integ['code']['files']} files; git {integ['code']['git-commit']}"
         f"{' (uncommitted changes)' if integ['code']['git-dirty'] else ''}"],
        ["app bundle (FAB)", fab["sha256"], f"{fab['bytes']:,} bytes; SuperLink recorded "
                                            f"{fab['superlink-recorded-sha256']}"],
        ["config", integ["config"]["sha256"], "canonical JSON in report.json"],
        *[[f"capture {n}", c["sha256"], c["path"]] for n, c in integ["captures"].items()],
        *([["TLS key log", integ["tls-key-log"]["sha256"], integ["tls-key-log"]["path"]]]
          if integ["tls-key-log"] else []),
        *[[f"version: {k}", "", str(v)] for k, v in integ["versions"].items()]]))
    out.append(("Limits", ["what this evidence does and does not show"], [[x] for x in r["limits"]]))
    return out


def _hits(hits: list[dict[str, str]]) -> str:
    if not hits:
        return "none"
    return "; ".join(f"{h['canary']} as {h['encoding']} in {h['where']}" for h in hits[:20]) + \
        (f"; and {len(hits) - 20} more" if len(hits) > 20 else "")


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Residency verification: {r['verdict']}", "", f"{r['verdict-reason']}.", ""]
    for title, head, rows in sections(r):
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin-bottom:1.5em;width:100%}td,th{border:1px solid #ccc;padding:4px 6px;"
        "text-align:left;vertical-align:top;font-size:13px;word-break:break-all}th{background:#f2f2f2}"
        ".PASS{color:#070}.LEAK{color:#b00}.INCONCLUSIVE{color:#a60}")


def page(r: dict[str, Any]) -> str:
    e = html.escape
    body = [f"<h1>Residency verification: <span class='{e(r['verdict'])}'>{e(r['verdict'])}</span></h1>",
            f"<p>{e(r['verdict-reason'])}.</p>"]
    for title, head, rows in sections(r):
        body.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        body.append("</table>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Residency verification</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
