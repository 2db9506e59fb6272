"""The `bridgepool` command.

    bridgepool run FEDERATION.toml          # your own centres and data (examples/, deploy/spec.py)
    bridgepool demo                         # 3 centres, real Flower federation, ~5 min on 2 CPU cores
    bridgepool demo --centres 2 --rounds 3 --model tiny --run-dir runs/quick
    bridgepool demo --resume runs/quick     # continue from the last good checkpoint
    bridgepool demo --centres 2 --nproc-per-centre 2 --model tiny   # each centre a 2-rank DDP cluster
    bridgepool demo --round-seconds 5       # unequal centres (the last one 3x slower) finishing together
    bridgepool demo --prometheus-port 9090  # metrics on 9300.., and a Prometheus scraping them
    bridgepool demo --prometheus-port 9090 --keep-metrics   # ... kept up after the run until Ctrl-C
    bridgepool data prepare --out DIR --source manpages:fr     # or a path, or hf:NAME
    bridgepool centre serve --centre fr-genci --data-dir D --state-dir S --socket S/worker.sock
    bridgepool centre serve --nproc 2 ...   # the centre as 2 data-parallel ranks (clients/ranks.py)
    bridgepool centre supernode --superlink HOST:PORT ...  # flower-supernode's flags; warm ClientApp runtime
    bridgepool report RUN_DIR               # PNG plots from run.json
    bridgepool deploy compose | register | netns   # multi-node (deploy/multinode.py, README)
    bridgepool audit RUN_DIR                # residency report: what left each centre (residency.json/.md)
    bridgepool verify residency [--leak-probe]   # canaries planted, every frame captured and searched (evidence bundle)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from deploy import appuser
from deploy.spec import BUILTIN_DEMO, FederationSpec, load_spec
from models.config import ConfigError, parse_overrides
from models.memory import prefer_huge_pages

SLOW_DEMO_SPEED = 1 / 3  # `demo --round-seconds`: the last centre's emulated speed (clients/training.py)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Ctrl-C (SIGINT) stops what a command started, also when it was started from a background job,
    # which inherits SIGINT ignored (Python then installs no handler and the command would not stop).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    prefer_huge_pages()  # before any tensor: every process bridgepool starts trains or sums faster (models/memory.py)
    if argv[:1] == ["bench"]:
        from benchmarks.federation import main as bench_main

        return bench_main(argv[1:])
    if argv[:2] == ["centre", "supernode"]:  # Flower's own flags pass through unparsed
        from clients.supernode import main as supernode_main

        supernode_main(argv[2:])
        return 0
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(argv)  # `centre serve --nproc N` re-launches itself with them
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

    d = sub.add_parser("demo", help="run the built-in federation (deploy/specs/demo.toml) end to end")
    d.add_argument("--centres", type=int, default=3, help="the first N centres of the built-in spec (default 3)")
    d.add_argument("--rounds", type=int)
    d.add_argument("--inner-steps", type=int)
    d.add_argument("--model", help="tiny | small | base | large | xl")
    d.add_argument("--strategy", help="diloco | fedavg")
    d.add_argument("--round-seconds", type=float, metavar="T",
                   help="time-budgeted rounds: each centre trains until its round's compute reaches T seconds; "
                        "the demo's last centre is then emulated 3x slower (speed 1/3), to show unequal centres "
                        "finishing together")
    _run_flags(d)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run the federation a spec file describes (centres, data, config, deployment)")
    r.add_argument("spec", type=Path, metavar="FEDERATION.toml", help="see examples/ and deploy/spec.py")
    _run_flags(r)
    r.set_defaults(func=cmd_run)

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
    prep.add_argument("--undecodable", choices=("stop", "skip"), default="stop",
                      help="a .txt/.md that is not UTF-8: stop with its name (default), or skip it "
                           "(the manifest counts the skipped files)")
    prep.set_defaults(func=cmd_data_prepare)

    centre = sub.add_parser("centre", help="centre-side processes").add_subparsers(required=True, dest="centre_cmd")
    serve = centre.add_parser("serve", help="long-lived worker: keeps model, data and optimiser warm")
    serve.add_argument("--centre", required=True)
    serve.add_argument("--data-dir", type=Path, required=True)
    serve.add_argument("--state-dir", type=Path, required=True)
    serve.add_argument("--socket", type=Path, required=True)
    serve.add_argument("--socket-group", default=None,
                       help="group that may connect to the socket (created 0660; default 0600: this user only); "
                            "the centre's runtime runs submitted bundles as a member of it (--app-user)")
    serve.add_argument("--require-run-ids", action="store_true",
                       help="serve a run's requests only inside a task the centre's runtime admitted: a run-name's "
                            "state belongs to the SuperLink run id first admitted for it, another run id is refused "
                            "unless it resumes (clients/runs.py); the launchers set it")
    serve.add_argument("--threads", type=int, default=0)
    serve.add_argument("--device", default="", help="auto | cpu | cuda: this centre's, over the run config's")
    serve.add_argument("--speed", type=float, default=1.0,
                       help="emulate a slower centre: 1/3 sleeps 2x each step's time after it (default 1, full speed)")
    serve.add_argument("--nice", type=int, default=0, help="lower the training priority by this much")
    serve.add_argument("--metrics-port", type=int, default=0, help="Prometheus endpoint port (0 = off)")
    serve.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics endpoint binds")
    serve.add_argument("--coordinator", action="append", default=[], metavar="HOST",
                       help="the only host this centre sends model bytes to on the data plane (repeatable; "
                            "default: loopback only, the single-machine demo)")
    serve.add_argument("--data-plane-ca", type=Path, metavar="FILE",
                       help="CA certificate the coordinator's data plane must present; plaintext is then refused")
    serve.add_argument("--nproc", type=int, default=1,
                       help="ranks of this centre on this node (data-parallel under torchrun; gloo on CPU, nccl on "
                            "CUDA); rank 0 is the worker, the others train with it (clients/ranks.py)")
    serve.add_argument("--shard", action="store_true",
                       help="split the model over the centre's ranks (FSDP2) instead of a whole copy on each "
                            "(DDP): for a model that does not fit one device; needs 2 ranks or more")
    serve.add_argument("--nnodes", type=int, default=1, help="nodes of this centre (each runs --nproc ranks)")
    serve.add_argument("--node-rank", type=int, default=0, help="this node's place among --nnodes (0 hosts rank 0)")
    serve.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                       help="node 0's rendezvous address, the same on every node (--nnodes > 1)")
    serve.add_argument("--rdzv-timeout", type=int, default=300, metavar="SECONDS",
                       help="how long node 0 waits for the other nodes (and they for node 0) at the rendezvous "
                            "(--nnodes > 1) before the centre fails, naming the node that never came (default 300)")
    serve.add_argument("--max-restarts", type=int, default=3,
                       help="times the centre's ranks are started again after one fails")
    serve.add_argument("--as-rank", action="store_true", help=argparse.SUPPRESS)  # set by the torchrun re-launch
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
    from deploy.residency.verify import add_verify_parser  # bridgepool verify residency

    add_verify_parser(sub)
    return p


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Flags `bridgepool demo` and `bridgepool run` share; each overrides the spec."""
    p.add_argument("--device", help="auto | cpu | cuda (run config; a centre's own device in the spec wins)")
    p.add_argument("--run-dir", type=Path, help="default: runs/NAME-YYYYmmdd-HHMMSS")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--base-port", type=int, help="SuperLink port; SuperNodes use the next ones (spec: 9200)")
    p.add_argument("--metrics-port", type=int,
                   help="server's Prometheus endpoint; centres use the next ports (0 = no metrics; spec: 9300)")
    p.add_argument("--prometheus-port", type=int, metavar="PORT",
                   help="also run Debian's prometheus on RUN_DIR/prometheus.yml at this port (0 = don't)")
    p.add_argument("--keep-metrics", action="store_true",
                   help="after the run, keep Prometheus and the centres' metrics up until Ctrl-C, and print "
                        "the URL and the queries to open")
    p.add_argument("--max-bytes", type=int, help="text per centre (0 = all; the spec's max-bytes otherwise)")
    p.add_argument("--nproc-per-centre", type=int, metavar="N",
                   help="data-parallel ranks in each centre (torchrun, gloo on CPU / nccl on CUDA; "
                        "the spec's nproc otherwise, default 1)")
    p.add_argument("--shard", action="store_true",
                   help="split each centre's model over its ranks (FSDP) instead of a whole copy on each; "
                        "needs --nproc-per-centre 2 or more (or the spec's nproc)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any [tool.flwr.app.config] key, e.g. --set inner-lr=1e-3")
    p.add_argument("--app-user", default="auto", metavar="auto|none|USER", help=appuser.HELP)


# ---------------------------------------------------------------- commands
def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Run-config keys from `--set` and the named flags (over the spec's [config])."""
    values = parse_overrides(args.set)
    flags = {"rounds": getattr(args, "rounds", None), "inner-steps": getattr(args, "inner_steps", None),
             "model": getattr(args, "model", None), "strategy": getattr(args, "strategy", None),
             "device": args.device, "round-seconds": getattr(args, "round_seconds", None)}
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


def apply_flags(spec: FederationSpec, args: argparse.Namespace) -> FederationSpec:
    """The spec with the command line's coordinator and data flags over it."""
    co = spec.coordinator
    flags = {"base_port": args.base_port, "metrics_port": args.metrics_port, "prometheus_port": args.prometheus_port}
    co = dataclasses.replace(co, **{k: v for k, v in flags.items() if v is not None})
    if args.keep_metrics:
        co = dataclasses.replace(co, keep_metrics=True)
    if co.keep_metrics and not co.metrics_port:
        raise ConfigError("--keep-metrics needs the metrics endpoints: a --metrics-port > 0")
    centres = spec.centres
    if args.max_bytes is not None:
        if args.max_bytes < 0:
            raise ConfigError(f"--max-bytes must be >= 0 (0 = all), got {args.max_bytes}")
        centres = tuple(dataclasses.replace(c, max_bytes=args.max_bytes) for c in centres)
    spec = dataclasses.replace(spec, coordinator=co, centres=centres)
    spec = spec.with_nproc(args.nproc_per_centre) if args.nproc_per_centre is not None else spec
    return spec.with_shard() if args.shard else spec


def run_spec(spec: FederationSpec, args: argparse.Namespace) -> int:
    """Everything `bridgepool run` and `bridgepool demo` do after parsing: validate, then run."""
    spec = apply_flags(spec, args)
    if args.resume and not (args.resume / "run.json").exists():
        raise FileNotFoundError(f"--resume {args.resume}: no run.json there; pass a run directory")
    run_dir = (args.resume or args.run_dir or Path("runs") / time.strftime(f"{spec.name}-%Y%m%d-%H%M%S")).resolve()
    saved = json.loads((run_dir / "run.json").read_text())["config"] if args.resume else None
    cfg = spec.run_config(run_dir, run_overrides(args), saved)
    if spec.deployment == "netns":
        from deploy.multinode import run_netns

        return run_netns(spec, run_dir, cfg, args.app_user)
    if spec.deployment == "compose":
        from deploy.multinode import write_compose

        return write_compose(spec, spec.path.with_name(f"{spec.path.stem}.compose.yml"))
    from deploy.runner import run_local

    return run_local(spec, run_dir, cfg, args.app_user)


def cmd_demo(args: argparse.Namespace) -> int:
    spec = load_spec(BUILTIN_DEMO).with_centres(args.centres)
    if args.round_seconds:  # one flag shows it: a centre 3x slower than the others, on the same budget
        spec = spec.with_slow_last_centre(SLOW_DEMO_SPEED)
    return run_spec(spec, args)


def cmd_run(args: argparse.Namespace) -> int:
    return run_spec(load_spec(args.spec), args)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from clients.data import DEFAULT_CENTRES, prepare_centre
    from deploy.runner import describe

    max_bytes = args.max_bytes or None
    if args.if_missing and args.source and (args.out / "manifest.json").exists():
        print(f"{args.out} already prepared (manifest.json); kept")
        return 0
    if args.source:
        m = prepare_centre(args.source, args.out, max_bytes=max_bytes, overwrite=args.overwrite,
                           undecodable=args.undecodable)
        print(f"prepared {args.out} from {args.source}: {describe(m)}")
        return 0
    for name, source in DEFAULT_CENTRES[: args.centres]:
        m = prepare_centre(source, args.out / name, max_bytes=max_bytes, overwrite=args.overwrite,
                           undecodable=args.undecodable)
        print(f"prepared {args.out / name} from {source}: {describe(m)}")
    return 0


def cmd_centre_serve(args: argparse.Namespace) -> int:
    import grp

    from clients.dataplane import LOOPBACK_HOSTS, Destination
    from clients.policy import Policy
    from clients.socketserve import serve
    from clients.worker import CentreWorker

    if args.shard and args.nproc * args.nnodes < 2 and not args.as_rank:
        raise ValueError(f"--shard splits the model over the centre's ranks, but --nproc {args.nproc} x --nnodes "
                         f"{args.nnodes} is 1 rank; start it with --nproc 2 or more, or without --shard")
    # Everything the worker writes (state, optimiser moments, ledger, checkpoints) is its user's alone.
    os.umask(0o077)
    if args.socket_group is not None:
        try:
            grp.getgrnam(args.socket_group)
        except KeyError:
            raise ValueError(f"--socket-group {args.socket_group}: no such group on this machine "
                             "(create it, e.g. `groupadd bridgepool-app`, or leave the flag out)") from None

    if args.data_plane_ca and not Path(args.data_plane_ca).is_file():
        raise FileNotFoundError(f"--data-plane-ca {args.data_plane_ca}: no such file (the deployment's CA certificate)")
    destination = Destination(tuple(args.coordinator) or LOOPBACK_HOSTS, str(args.data_plane_ca or ""))
    policy = Policy.load(args.policy) if args.policy is not None else Policy()
    if (args.nproc > 1 or args.nnodes > 1) and not args.as_rank:
        from clients.launch import launch_argv, rendezvous_missing, supervise

        # torchrun's agent runs this command again in each rank with --as-rank; this process watches
        # it, starts it again when the ranks fail, and stops it (and so the ranks) when stopped.
        worker_argv = ["deploy.cli", *strip_flags(args.argv, LAUNCH_FLAGS), "--as-rank"]
        if args.rdzv_timeout < 1:
            raise ValueError(f"--rdzv-timeout must be at least 1 second, got {args.rdzv_timeout}")
        argv = launch_argv(worker_argv, args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint,
                           args.rdzv_timeout)
        logging.getLogger("bridgepool").info("centre %s: %d rank(s) on this node: %s", args.centre, args.nproc,
                                             " ".join(argv))
        explain = functools.partial(rendezvous_missing, centre=args.centre, nproc=args.nproc, nnodes=args.nnodes,
                                    node_rank=args.node_rank, endpoint=args.rdzv_endpoint, timeout=args.rdzv_timeout)
        return supervise(argv, args.centre, args.max_restarts, explain)
    kwargs: dict[str, Any] = dict(threads=args.threads, nice=args.nice, policy=policy, destination=destination,
                                  device=args.device, speed=args.speed, run_ids=args.require_run_ids)
    ranks = None
    if args.as_rank:
        from clients.ranks import Ranks, RankZeroWorker, follow, stop_followers

        ranks = Ranks.join(args.centre, args.device, shard=args.shard)
        if ranks.rank:  # no socket, no metrics endpoint: rank 0 is the centre's only door
            if args.nice:
                from clients.priority import lower_priority

                lower_priority(args.nice)
            follow(ranks, args.data_dir, args.state_dir, args.device)
            return 0
        worker: CentreWorker = RankZeroWorker(ranks, args.centre, args.data_dir, args.state_dir, **kwargs)
    else:
        worker = CentreWorker(args.centre, args.data_dir, args.state_dir, **kwargs)
    worker.metrics.serve(args.metrics_port, args.metrics_host)  # a taken port fails here, before the socket
    try:
        serve(worker, args.socket, args.socket_group)
    finally:
        if ranks is not None:
            stop_followers(ranks)
    return 0


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-timeout", "--max-restarts")


def strip_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` without `flags` and their values (as `--flag V` or `--flag=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in flags)):
            out.append(arg)
    return out


def cmd_audit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from deploy.runner import audit_run

    report = audit_run(Console(), args.run_dir)
    return 1 if report["verdict"] == "fail" else 0  # "no traffic" is no residency failure


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
