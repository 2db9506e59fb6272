"""`bridgepool verify residency`: a residency proof an evaluator runs, keeps and can re-run.

    sudo bridgepool verify residency                                # default centres, random canaries
    sudo bridgepool verify residency --spec my-federation.toml --canary "PATIENT-7781-XQ" --out evidence/
    sudo bridgepool verify residency --leak-probe                   # must end in LEAK (exit 1)

It builds a throwaway verification federation (netns topology as root, else loopback; the method is
in the report), plants canaries in each centre's copy of its corpus, runs real rounds of the app,
captures every frame on every centre's link (control plane and the data plane that carries the
model), decrypts TLS with the session keys its processes log, and searches the plaintext, the raw
capture, the SuperLink's database and every file the coordinator wrote, in every encoding of
deploy/residency/search.py. Positive controls show the search can see: the round-1 global model
and the run's name must be found in the capture, and `--leak-probe` sends a probe canary that must be
caught. Verdict: PASS (exit 0), LEAK (a canary found, or a centre's link carried traffic to anything
but the coordinator; exit 1), INCONCLUSIVE (a control failed: the proof does not hold; exit 2).
The evidence bundle (deploy/residency/bundle.py) is written to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from deploy.residency import bundle
from deploy.residency.capture import link_counts, read_packets, read_pcap, stray_packets, tcp_streams
from deploy.residency.search import Hit, capture_haystacks, files_under, search, stream_haystacks
from deploy.spec import BUILTIN_DEMO, FederationSpec, load_spec
from models.config import APP_DIR, ConfigError, RunConfig, parse_overrides

TOPOLOGIES = ("auto", "netns", "loopback")
MIN_CANARY_BYTES = 12  # shorter strings could occur in model bytes or protocol framing by chance
CANARY_DOCS = 30  # documents planted per centre, each holding its canary once
FILLER = ("Ordinary prose follows so that the model has something to learn from. " * 4).strip()
# Without --spec: the demo's centres, small and quick (a proof about the code path, not the model size).
QUICK = {"model": "tiny", "rounds": 1, "inner-steps": 2, "batch-size": 4, "inner-warmup-steps": 1,
         "threads": 1, "eval-batches": 1, "device": "cpu", "connect-timeout": 120.0, "round-timeout": 180.0}


def add_verify_parser(sub: Any) -> None:
    ver = sub.add_parser("verify", help="evidence for evaluators").add_subparsers(required=True, dest="verify_cmd")
    res = ver.add_parser("residency", help="plant canaries, run real rounds, capture and search every frame")
    res.add_argument("--spec", type=Path, help="a federation spec: its centres, sources and [config] (its deployment "
                     "and ports are replaced by the verification topology); default: the built-in demo's centres")
    res.add_argument("--centres", type=int, default=2, help="without --spec: the first N demo centres (default 2)")
    res.add_argument("--canary", action="append", default=[], metavar="TEXT",
                     help=f"a canary string (>= {MIN_CANARY_BYTES} UTF-8 bytes); the i-th goes to the i-th centre, "
                          "centres without one get a random one")
    res.add_argument("--topology", choices=TOPOLOGIES, default="auto",
                     help="auto: netns when root with ip/unshare/tshark, else loopback")
    res.add_argument("--leak-probe", action="store_true",
                     help="positive control: a centre deliberately sends a probe canary; the verdict must be LEAK")
    res.add_argument("--max-bytes", type=int, default=40_000, help="corpus text per centre (0 = all; default 40000)")
    res.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any [tool.flwr.app.config] key for the verification run, e.g. --set rounds=2")
    res.add_argument("--app", type=Path, default=APP_DIR, help="the app bundle's directory to verify "
                     "(default: bridgepool's own)")
    res.add_argument("--base-port", type=int, default=0, help="SuperLink port (0 = a free range)")
    res.add_argument("--out", type=Path, help="the evidence bundle (default runs/verify-residency-YYYYmmdd-HHMMSS)")
    res.set_defaults(func=cmd_verify_residency)


def cmd_verify_residency(args: argparse.Namespace) -> int:
    report = verify(args)
    for path in report["files"]["reports"]:
        print(path)
    print(f"verdict: {report['verdict']} ({report['verdict-reason']})")
    return {"PASS": 0, "LEAK": 1}.get(report["verdict"], 2)


# ---------------------------------------------------------------- the proof
def verify(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command does; returns the JSON report (also written into the bundle)."""
    t0 = time.time()
    method, why = choose_topology(args.topology)
    spec = _spec(args)
    out = (args.out or Path("runs") / time.strftime("verify-residency-%Y%m%d-%H%M%S")).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty; give a new directory for the evidence bundle")
    run_dir = out / f"verify-{secrets.token_hex(6)}"  # its name is the run's name: a public marker
    overrides = {**(QUICK if args.spec is None else {}), **parse_overrides(args.set)}
    cfg = spec.run_config(run_dir, overrides)
    canaries = assign_canaries(args.canary, [c.name for c in spec.centres])
    probe = f"probe{secrets.token_hex(12)}" if args.leak_probe else ""
    planted = plant(spec, run_dir, canaries, {spec.centres[0].name: probe} if probe else {}, out / "staging")
    print(f"verify residency: {method} topology ({why}); {len(spec.centres)} centres; bundle {out}", flush=True)

    fed, run, probe_log, env = _run(method, spec, run_dir, cfg, out / "capture", args, probe)
    from deploy.audit import write_report

    guard = write_report(run_dir)[2] if (run_dir / "run.json").exists() else None  # the egress ledgers
    labels = {**canaries, **({f"probe ({spec.centres[0].name})": probe} if probe else {})}
    evidence = analyse(fed, method, run_dir, labels, env.get("keylog"))
    report = {
        "command": recorded_command(args, out, canaries),
        "method": method, "method-reason": why, "started": t0, "finished": time.time(),
        "config": cfg.to_mapping(), "centres": [c.name for c in spec.centres], "canaries": canaries,
        "planted": planted, "probe": {"sent": bool(probe), "canary": probe, "from": spec.centres[0].name,
                                      "log": probe_log} if probe else {"sent": False},
        "run": {"name": run_dir.name, "status": run.get("status"), "message": run.get("message"),
                "rounds": len(run.get("rounds", [])), "dp": (run.get("rounds") or [{}])[-1].get("dp")},
        "guard": {"verdict": guard["verdict"], "report": str(run_dir / "residency.json")} if guard else None,
        **evidence,
    }
    report["integrity"] = bundle.integrity(out, cfg, args.app, env["fab-hashes"], fed.captures, env.get("keylog"))
    if report["integrity"]["app-bundle"]["matches-run"] is not True:  # the hashes would describe other code
        report["problems"].append("the app bundle the SuperLink ran is not the one hashed here "
                                  f"({env['fab-hashes']} against {report['integrity']['app-bundle']['sha256']})")
    report["verdict"], report["verdict-reason"] = verdict(report)
    report["limits"] = bundle.limits(report["run"]["dp"])
    report["files"] = {"reports": [str(p) for p in bundle.write(out, report)]}
    shutil.rmtree(out / "staging", ignore_errors=True)
    return report


def choose_topology(want: str) -> tuple[str, str]:
    from deploy.netns import netns_available

    why_not = netns_available() or (None if shutil.which("tshark") else "tshark is not installed")
    if want == "netns" and why_not:
        raise RuntimeError(f"--topology netns: {why_not}")
    if shutil.which("tcpdump") is None:
        raise RuntimeError("tcpdump is not installed (Debian package tcpdump: deploy/install-system-packages.sh)")
    if want == "loopback":
        return "loopback", "asked for (--topology loopback)"
    if why_not:
        return "loopback", f"netns not available: {why_not}"
    return "netns", "root with ip, unshare and tshark: each centre on a link of its own, TLS on"


def _spec(args: argparse.Namespace) -> FederationSpec:
    spec = load_spec(args.spec) if args.spec is not None else load_spec(BUILTIN_DEMO).with_centres(args.centres)
    if args.max_bytes < 0:
        raise ConfigError(f"--max-bytes must be >= 0 (0 = all), got {args.max_bytes}")
    if len(spec.centres) < 2 and args.leak_probe:
        raise ConfigError("--leak-probe needs at least 2 centres (it also dials the other centre)")
    return dataclasses.replace(spec, name="verify", centres=tuple(
        dataclasses.replace(c, max_bytes=args.max_bytes) for c in spec.centres))


def assign_canaries(given: list[str], centres: list[str]) -> dict[str, str]:
    """Centre -> canary: the i-th given one to the i-th centre, random ones for the rest."""
    if len(given) > len(centres):
        raise ConfigError(f"--canary given {len(given)} times for {len(centres)} centres; at most one per centre")
    for text in given:
        if len(text.encode("utf-8")) < MIN_CANARY_BYTES or "\n" in text:
            raise ConfigError(f"--canary {text!r}: need one line of at least {MIN_CANARY_BYTES} UTF-8 bytes "
                              "(a short string can occur by chance)")
    return {c: given[i] if i < len(given) else f"canary{secrets.token_hex(12)}" for i, c in enumerate(centres)}


def plant(spec: FederationSpec, run_dir: Path, canaries: dict[str, str], extra: dict[str, str],
          staging: Path) -> dict[str, Any]:
    """Each centre's corpus copy: its source's documents plus CANARY_DOCS documents holding its canary
    (and `extra[centre]`, the probe, in one of them), prepared into the run's layout (deploy/local.py)."""
    from clients.data import prepare_centre
    from clients.sources import read_documents
    from deploy.local import centre_dirs

    out = {}
    for c in spec.centres:
        folder = staging / c.name
        folder.mkdir(parents=True)
        docs = list(read_documents(c.source, max_bytes=c.max_bytes or None, undecodable=c.undecodable))
        for i, text in enumerate(docs):
            (folder / f"source-{i:05d}.txt").write_text(text, encoding="utf-8")
        for i in range(CANARY_DOCS):
            probe = f" Also {extra[c.name]}." if c.name in extra and i == 0 else ""
            (folder / f"canary-{i:03d}.txt").write_text(f"Record {i} of {c.name}: reference {canaries[c.name]}."
                                                        f"{probe} {FILLER}\n", encoding="utf-8")
        data_dir = centre_dirs(run_dir, c.name, c.device, c.threads).data_dir
        manifest = prepare_centre(str(folder), data_dir)
        found = {h.canary for h in search(files_under(data_dir), {c.name: canaries[c.name]})}
        if found != {c.name}:  # the planted canary must be there to find, or the search proves nothing
            raise RuntimeError(f"{c.name}: the canary is not in its prepared corpus {data_dir}")
        out[c.name] = {"source": c.source, "source-documents": len(docs), "canary-documents": CANARY_DOCS,
                       "train-sha256": manifest["splits"]["train"]["sha256"],
                       "validation-sha256": manifest["splits"]["validation"]["sha256"]}
    return out


def _run(method: str, spec: FederationSpec, run_dir: Path, cfg: RunConfig, capture_dir: Path,
         args: argparse.Namespace, probe: str) -> tuple[Any, dict, str, dict[str, Any]]:
    """Start the captured federation, run, send the probe if asked, stop. Returns (federation, run.json,
    probe output, {"keylog": path or None, "fab-hashes": what the SuperLink ran})."""
    from deploy.local import centre_dirs
    from deploy.processes import free_base_port
    from deploy.residency.tls import keylog_hook
    from deploy.residency.topology import CapturedLoopback, CapturedNetns, recorded_fab_hashes

    centres = [centre_dirs(run_dir, c.name, c.device, c.threads) for c in spec.centres]
    base = args.base_port or free_base_port(2 + len(centres))  # SuperLink, SuperNode runtimes, data plane
    env: dict[str, Any] = {"keylog": None, "fab-hashes": []}
    saved = dict(os.environ)
    if method == "netns":
        env["keylog"] = capture_dir / "tls-keys.log"
        # Each centre's worker runs as the centre's own user (deploy/netns.py) and must append its secrets
        # too: writable by all, readable by root only (it decrypts the capture).
        env["keylog"].parent.mkdir(parents=True, exist_ok=True)
        env["keylog"].touch()
        env["keylog"].chmod(0o622)
        os.environ.update(keylog_hook(capture_dir / "keylog-hook", env["keylog"]))  # inherited by every process
        fed: Any = CapturedNetns(run_dir, centres, base_port=base, capture_dir=capture_dir)
    else:
        fed = CapturedLoopback(run_dir, centres, base, capture_dir)
    probe_log = ""
    try:
        with fed:
            run = fed.wait(fed.submit(cfg.to_mapping(), app_dir=args.app), timeout=3600)
            env["fab-hashes"] = recorded_fab_hashes(fed)
            if probe:  # while everything is still up
                other = centres[1].name if len(centres) > 1 else ""
                probe_log = fed.leak_probe(centres[0].name, other, probe)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return fed, run, probe_log, env


# ------------------------------------------------------------- the analysis
def analyse(fed: Any, method: str, run_dir: Path, canaries: dict[str, str], keylog: Path | None) -> dict[str, Any]:
    """Per link: counts, drops, who talked to whom; then every search and the public markers."""
    from safetensors.torch import load_file

    from deploy.residency.tls import TlsError, tls_plaintexts
    from models.gpt import build_model
    from models.packing import pack

    links: dict[str, Any] = {}
    hay: dict[str, bytes] = {}
    plain: dict[str, bytes] = {}
    codings: set[str] = set()
    problems: list[str] = []
    server_ip = getattr(fed, "addresses", {}).get("server", "127.0.0.1")
    for name, cap in fed.captures.items():
        counts = link_counts(cap.pcap)
        listed = subprocess.run(["tcpdump", "-nn", "-r", str(cap.pcap)], capture_output=True, text=True)
        link = {"interface": fed.links[name], "pcap": str(cap.pcap), **counts, "dropped": cap.dropped,
                "tcpdump-recount": len(listed.stdout.splitlines())}
        if cap.dropped != 0:
            problems.append(f"{name}: tcpdump dropped {cap.dropped} packets: the capture is incomplete")
        if link["tcpdump-recount"] != counts["frames"]:
            problems.append(f"{name}: tcpdump reads {link['tcpdump-recount']} frames, the parser {counts['frames']}")
        streams = tcp_streams(read_pcap(cap.pcap))
        if method == "netns":
            ports = (fed.superlink_port, fed.data_plane_port)
            packets = list(read_packets(cap.pcap))
            strays = stray_packets(packets, fed.addresses[name], server_ip, ports)
            link["address"], link["coordinator"] = fed.addresses[name], server_ip
            link["to-coordinator-frames"] = {"superlink": sum(p.proto == "tcp" and ports[0] in (p.sport, p.dport)
                                                              for p in packets),
                                             "data-plane": sum(p.proto == "tcp" and ports[1] in (p.sport, p.dport)
                                                               for p in packets)}
            link["strays"] = [dataclasses.asdict(p) for p in strays]
            try:
                decrypted = tls_plaintexts(cap.pcap, keylog)
            except TlsError as err:
                problems.append(f"{name}: TLS not decrypted, the link is not searched in plaintext: {err}")
                decrypted = {}
            link["connections-decrypted"] = len({n.split("#")[1] for n in decrypted})
            if decrypted and sorted(n.split("#")[0] for n in decrypted) != \
                    sorted(n.split("#")[0] for n, d in streams.items() if d):
                problems.append(f"{name}: tshark and the TCP reassembly disagree on the connections with payload")
            found, seen = stream_haystacks(decrypted, "tls")
            plain.update({f"{name} {k}": v for k, v in decrypted.items()})
        else:
            found, seen = stream_haystacks(streams, "tcp")
            plain.update({f"{name} {k}": v for k, v in streams.items()})
        codings |= seen
        hay.update({f"{name}: {k}": v for k, v in found.items()})
        raw, seen = capture_haystacks(cap.pcap)  # the raw bytes too (ciphertext under TLS)
        codings |= seen
        hay.update({f"{name}: raw {k}": v for k, v in raw.items()})
        links[name] = link
    if not codings <= {"identity"}:
        problems.append(f"content-encodings {sorted(codings)} seen: check the search decodes them")

    coordinator = files_under(run_dir, exclude=[run_dir / "centres"])
    capture_hits = search(hay, canaries)
    file_hits = search(coordinator, canaries)

    markers: dict[str, Any] = {}
    ckpt = run_dir / "checkpoints" / "round-0001" / "model.safetensors"
    if ckpt.exists():
        state = load_file(ckpt)
        model = build_model(str(_run_model(run_dir)), seed=0).state_dict()
        model_bytes = pack({k: state[k] for k in model}).tobytes()
        markers["round-1 global model bytes"] = {
            "bytes": len(model_bytes),
            "found-in": sorted({k.split(" ")[0] for k, v in plain.items() if model_bytes in v})}
    else:
        markers["round-1 global model bytes"] = {"bytes": 0, "found-in": [], "why": "no round-1 checkpoint"}
    name = run_dir.name.encode()
    markers["run name"] = {"text": run_dir.name, "found-in": sorted({k.split(" ")[0] for k, v in plain.items()
                                                                    if name in v})}
    return {"links": links, "problems": problems, "content-encodings": sorted(codings),
            "searches": {"capture": {"haystacks": len(hay), "bytes": sum(map(len, hay.values())),
                                     "hits": [dataclasses.asdict(h) for h in capture_hits]},
                         "coordinator-files": {"files": {k: len(v) for k, v in coordinator.items()},
                                               "hits": [dataclasses.asdict(h) for h in file_hits]}},
            "encodings": _encoding_names(), "markers": markers}


def _run_model(run_dir: Path) -> str:
    import json

    return json.loads((run_dir / "run.json").read_text())["config"]["model"]


def _encoding_names() -> list[str]:
    from deploy.residency.search import encodings

    return list(encodings("x" * MIN_CANARY_BYTES))


def verdict(report: dict[str, Any]) -> tuple[str, str]:
    hits = [Hit(**h) for s in report["searches"].values() for h in s["hits"]]
    strays = {n: link["strays"] for n, link in report["links"].items() if link.get("strays")}
    if hits or strays:
        what = sorted({h.canary for h in hits})
        return "LEAK", "; ".join(filter(None, [f"canaries found: {', '.join(what)}" if what else "",
                                               f"traffic to other hosts or ports on {', '.join(strays)}"
                                               if strays else ""]))
    if report["probe"]["sent"]:
        return "INCONCLUSIVE", "the leak probe was sent and not caught: the search cannot see"
    failed = list(report["problems"])
    links = list(report["links"]) if report["method"] == "netns" else None
    for marker, m in report["markers"].items():
        need = links or ["lo"]
        if sorted(set(need) - set(m["found-in"])):
            failed.append(f"public marker '{marker}' not found on {', '.join(sorted(set(need) - set(m['found-in'])))}")
    if report["run"]["status"] != "finished":
        failed.append(f"the run did not finish ({report['run']['status']}: {report['run']['message']})")
    if failed:
        return "INCONCLUSIVE", "; ".join(failed)
    return "PASS", "no canary in any encoding on any link or in the coordinator's files; every control seen"


def recorded_command(args: argparse.Namespace, out: Path, canaries: dict[str, str]) -> str:
    """The command that re-runs this proof with the same canaries, config and app (a new bundle dir)."""
    argv = ["bridgepool", "verify", "residency", "--topology", args.topology]
    argv += ["--spec", str(Path(args.spec).resolve())] if args.spec else ["--centres", str(args.centres)]
    for c in canaries.values():
        argv += ["--canary", c]
    argv += ["--max-bytes", str(args.max_bytes)]
    for kv in args.set:
        argv += ["--set", kv]
    if Path(args.app).resolve() != APP_DIR.resolve():
        argv += ["--app", str(Path(args.app).resolve())]
    if args.leak_probe:
        argv.append("--leak-probe")
    argv += ["--out", str(out) + "-rerun"]
    return shlex.join(argv)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bridgepool")
    add_verify_parser(p.add_subparsers(required=True))
    a = p.parse_args(sys.argv[1:])
    raise SystemExit(a.func(a))
