"""The `bridgepool` command.

    bridgepool demo                         # 3 centres, real Flower federation, ~5 min on 2 CPU cores
    bridgepool demo --centres 2 --rounds 3 --model tiny --run-dir runs/quick
    bridgepool demo --resume runs/quick     # continue from the last good checkpoint
    bridgepool demo --prometheus-port 9090  # metrics on 9300.., and a Prometheus scraping them
    bridgepool data prepare --out DIR --source manpages:fr     # or a path, or hf:NAME
    bridgepool centre serve --centre fr-genci --data-dir D --state-dir S --socket S/worker.sock
    bridgepool centre supernode --superlink HOST:PORT ...  # flower-supernode's flags; warm ClientApp runtime
    bridgepool report RUN_DIR               # PNG plots from run.json
    bridgepool deploy compose | register | netns   # multi-node (deploy/multinode.py, README)
    bridgepool audit RUN_DIR                # residency report: what left each centre (residency.json/.md)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from models.config import ConfigError, RunConfig, load_defaults, parse_overrides

DEMO_MAX_BYTES = 3_000_000  # per centre: enough text for the demo, prepared in seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from benchmarks.federation import main as bench_main

        return bench_main(argv[1:])
    if argv[:2] == ["centre", "supernode"]:  # Flower's own flags pass through unparsed
        from clients.supernode import main as supernode_main

        supernode_main(argv[2:])
        return 0
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError, TimeoutError) as err:
        print(f"bridgepool: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bridgepool: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridgepool", description="Sovereign pooled pre-training on Flower")
    sub = p.add_subparsers(required=True, dest="command")

    d = sub.add_parser("demo", help="run a real local federation end to end")
    d.add_argument("--centres", type=int, default=3, help="number of centres (default 3)")
    d.add_argument("--rounds", type=int)
    d.add_argument("--inner-steps", type=int)
    d.add_argument("--model", help="tiny | small | base | large | xl")
    d.add_argument("--strategy", help="diloco | fedavg")
    d.add_argument("--device", help="auto | cpu | cuda")
    d.add_argument("--run-dir", type=Path, help="default: runs/demo-YYYYmmdd-HHMMSS")
    d.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    d.add_argument("--base-port", type=int, default=9200, help="SuperLink port; SuperNodes use the next ones")
    d.add_argument("--metrics-port", type=int, default=9300,
                   help="server's Prometheus endpoint; centres use the next ports (0 = no metrics)")
    d.add_argument("--prometheus-port", type=int, default=0, metavar="PORT",
                   help="also run Debian's prometheus on RUN_DIR/prometheus.yml at this port (0 = don't)")
    d.add_argument("--max-bytes", type=int, default=DEMO_MAX_BYTES, help="text per centre (0 = all)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any [tool.flwr.app.config] key, e.g. --set inner-lr=1e-3")
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="prepare centre corpora").add_subparsers(required=True, dest="data_cmd")
    prep = data.add_parser("prepare", help="build a centre's train/validation directory")
    prep.add_argument("--out", type=Path, required=True,
                      help="with --source: the centre's data dir; otherwise the parent of one dir per centre")
    prep.add_argument("--source", help="manpages:LANG, a local file/dir (txt, jsonl, parquet) or hf:NAME")
    prep.add_argument("--centres", type=int, default=3, help="without --source: default centres to build")
    prep.add_argument("--max-bytes", type=int, default=0, help="cap per centre (0 = all)")
    prep.add_argument("--overwrite", action="store_true")
    prep.add_argument("--if-missing", action="store_true",
                      help="keep a centre's data dir that already holds a manifest.json (e.g. a compose restart)")
    prep.set_defaults(func=cmd_data_prepare)

    centre = sub.add_parser("centre", help="centre-side processes").add_subparsers(required=True, dest="centre_cmd")
    serve = centre.add_parser("serve", help="long-lived worker: keeps model, data and optimiser warm")
    serve.add_argument("--centre", required=True)
    serve.add_argument("--data-dir", type=Path, required=True)
    serve.add_argument("--state-dir", type=Path, required=True)
    serve.add_argument("--socket", type=Path, required=True)
    serve.add_argument("--threads", type=int, default=0)
    serve.add_argument("--nice", type=int, default=0, help="lower the training priority by this much")
    serve.add_argument("--metrics-port", type=int, default=0, help="Prometheus endpoint port (0 = off)")
    serve.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics endpoint binds")
    serve.add_argument("--coordinator", action="append", default=[], metavar="HOST",
                       help="the only host this centre sends model bytes to on the data plane (repeatable; "
                            "default: loopback only, the single-machine demo)")
    serve.add_argument("--data-plane-ca", type=Path, metavar="FILE",
                       help="CA certificate the coordinator's data plane must present; plaintext is then refused")
    serve.add_argument("--policy", type=Path, default=None,
                       help="the centre's policy file (TOML or YAML; clients/policy.py): minimum tokens per "
                            "request, lr bounds, request budget, models, clip + noise, socket limits")
    serve.set_defaults(func=cmd_centre_serve)
    # `bridgepool centre supernode ARGS` goes to clients/supernode.py (see main()).
    centre.add_parser("supernode", help="Flower's SuperNode with a warm ClientApp runtime; takes "
                      "flower-supernode's flags plus --idle-poll, --reply-poll, --no-warm")

    # `bridgepool bench ARGS` hands ARGS to benchmarks/federation.py (see main()).
    sub.add_parser("bench", help="federation-overhead benchmark; `bridgepool bench --help`")

    rep = sub.add_parser("report", help="PNG plots and a summary from RUN_DIR/run.json")
    rep.add_argument("run_dir", type=Path)
    rep.set_defaults(func=cmd_report)

    aud = sub.add_parser("audit", help="residency report: what left each centre, from its egress ledger")
    aud.add_argument("run_dir", type=Path)
    aud.set_defaults(func=cmd_audit)

    from deploy.multinode import add_deploy_parser  # bridgepool deploy compose | register | netns

    add_deploy_parser(sub)
    return p


# ---------------------------------------------------------------- commands
def demo_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """Defaults from pyproject, then the flags; validated before anything starts."""
    values: dict[str, Any] = load_defaults()
    if args.resume:
        saved = json.loads((run_dir / "run.json").read_text())["config"]
        values.update(saved)
    values.update(parse_overrides(args.set))
    flags = {"rounds": args.rounds, "inner-steps": args.inner_steps, "model": args.model,
             "strategy": args.strategy, "device": args.device}
    values.update({k: v for k, v in flags.items() if v is not None})
    values.update({"expected-centres": args.centres, "run-dir": str(run_dir.resolve()),
                   "run-name": run_dir.name, "resume": bool(args.resume)})
    return RunConfig.from_mapping(values)


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from clients.data import DEFAULT_CENTRES
    from deploy.live import LiveView, summary_table
    from deploy.local import LocalFederation, centre_dirs
    from deploy.report import plot_run, summary_rows

    console = Console()
    if not 1 <= args.centres <= len(DEFAULT_CENTRES):
        raise ConfigError(f"--centres must be between 1 and {len(DEFAULT_CENTRES)} "
                          f"(one corpus each: {', '.join(n for n, _ in DEFAULT_CENTRES)})")
    if args.resume and not (args.resume / "run.json").exists():
        raise FileNotFoundError(f"--resume {args.resume}: no run.json there; pass a demo run directory")
    run_dir = (args.resume or args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    cfg = demo_config(args, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    centres = [centre_dirs(run_dir, name) for name, _ in DEFAULT_CENTRES[: args.centres]]
    _prepare_demo_data(console, centres, dict(DEFAULT_CENTRES), args.max_bytes or None)

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    console.print(f"[bold]bridgepool demo[/]: {len(centres)} centres, {cfg.rounds} rounds x "
                  f"{cfg.inner_steps} inner steps, model {cfg.model}, strategy {cfg.strategy}; "
                  f"run directory {run_dir}")
    with LocalFederation(run_dir, centres, base_port=args.base_port, metrics_port=args.metrics_port) as fed, \
            contextlib.ExitStack() as stack:
        console.print(f"SuperLink on 127.0.0.1:{fed.superlink_port}; logs in {fed.logs}")
        _start_monitoring(console, fed, stack, args.prometheus_port)
        flwr_run = fed.submit(cfg.to_mapping())
        with LiveView(console, cfg.rounds, [c.name for c in centres]) as view:
            run = fed.wait(flwr_run, on_tick=view.update)
    wall = time.monotonic() - t0
    _audit(console, run_dir)  # also for a failed run: a blocked egress is one way to fail
    if run.get("status") != "finished":
        raise RuntimeError(f"run failed: {run.get('message', 'see logs in ' + str(run_dir / 'logs'))}")
    pngs = plot_run(run_dir)
    console.print(summary_table(summary_rows(run), f"bridgepool demo finished in {wall:.0f}s"))
    console.print(f"final model: {run['final']['model']}\nrun record:  {run_dir / 'run.json'}\n"
                  f"plots:       {', '.join(str(p) for p in pngs)}\n"
                  f"checkpoints: {run_dir / 'checkpoints'}")
    return 0


def _start_monitoring(console: Any, fed: Any, stack: contextlib.ExitStack, prometheus_port: int) -> None:
    """Print the metrics endpoints; start Prometheus on them if asked (stopped with the demo)."""
    from deploy.prometheus import Prometheus

    for who, url in fed.metrics_endpoints().items():
        console.print(f"metrics of {who}: {url}")
    if not fed.metrics_port:
        return
    config = fed.run_dir / "prometheus.yml"
    if prometheus_port:
        prom = stack.enter_context(Prometheus(config, fed.run_dir / "prometheus", prometheus_port,
                                              fed.logs / "prometheus.log"))
        console.print(f"Prometheus: {prom.url} (try `sum(rate(bridgepool_tokens_total[30s]))`)")
    else:
        console.print(f"scrape config: {config} (`prometheus --config.file {config}`, or --prometheus-port)")


def _prepare_demo_data(console: Any, centres: list, sources: dict[str, str], max_bytes: int | None) -> None:
    from clients.data import prepare_centre

    for c in centres:
        if (c.data_dir / "manifest.json").exists():
            continue  # prepared earlier (e.g. a resumed run): never rebuilt under a running centre
        m = prepare_centre(sources[c.name], c.data_dir, max_bytes=max_bytes)
        console.print(f"prepared {c.name} from {sources[c.name]}: {_describe(m)}")


def _describe(manifest: dict) -> str:
    splits = manifest.get("splits", {})
    return ", ".join(f"{name} {s['documents']} documents / {s['bytes'] / 1e6:.2f} MB"
                     for name, s in splits.items())


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from clients.data import DEFAULT_CENTRES, prepare_centre

    max_bytes = args.max_bytes or None
    if args.if_missing and args.source and (args.out / "manifest.json").exists():
        print(f"{args.out} already prepared (manifest.json); kept")
        return 0
    if args.source:
        m = prepare_centre(args.source, args.out, max_bytes=max_bytes, overwrite=args.overwrite)
        print(f"prepared {args.out} from {args.source}: {_describe(m)}")
        return 0
    for name, source in DEFAULT_CENTRES[: args.centres]:
        m = prepare_centre(source, args.out / name, max_bytes=max_bytes, overwrite=args.overwrite)
        print(f"prepared {args.out / name} from {source}: {_describe(m)}")
    return 0


def cmd_centre_serve(args: argparse.Namespace) -> int:
    from clients.dataplane import LOOPBACK_HOSTS, Destination
    from clients.policy import Policy
    from clients.worker import CentreWorker, serve

    if args.data_plane_ca and not Path(args.data_plane_ca).is_file():
        raise FileNotFoundError(f"--data-plane-ca {args.data_plane_ca}: no such file (the deployment's CA certificate)")
    destination = Destination(tuple(args.coordinator) or LOOPBACK_HOSTS, str(args.data_plane_ca or ""))
    policy = Policy.load(args.policy) if args.policy is not None else Policy()
    worker = CentreWorker(args.centre, args.data_dir, args.state_dir, threads=args.threads, nice=args.nice,
                          policy=policy, destination=destination)
    worker.metrics.serve(args.metrics_port, args.metrics_host)  # a taken port fails here, before the socket
    serve(worker, args.socket)
    return 0


def _audit(console: Any, run_dir: Path) -> dict:
    from deploy.audit import summary, write_report

    js, md, report = write_report(run_dir)
    console.print(f"{summary(report)}\nresidency:   {md} (and {js.name})")
    return report


def cmd_audit(args: argparse.Namespace) -> int:
    from rich.console import Console

    report = _audit(Console(), args.run_dir)
    return 0 if report["verdict"] == "pass" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from deploy.live import summary_table
    from deploy.report import load_run, plot_run, summary_rows

    pngs = plot_run(args.run_dir)
    Console().print(summary_table(summary_rows(load_run(args.run_dir)), str(args.run_dir)))
    print("\n".join(str(p) for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
