"""`bridgepool deploy ...`: the multi-node deployment commands.

    bridgepool deploy compose [--check]          # (re)generate docker-compose.yml from deploy/commands.py
    bridgepool deploy up [--offline] [--set rounds=3]   # build, start, wait, summary, residency verdict
    bridgepool deploy down                       # remove the compose project's containers, networks, volumes
    bridgepool deploy register --connection bridgepool KEY.pub...   # SuperNode keys, at the SuperLink
    sudo bridgepool deploy netns --centres 3 --rounds 2 --model tiny   # hosts as network namespaces
    sudo bridgepool deploy netns --spec examples/own-jsonl.toml         # a spec's centres and data
    bridgepool deploy compose --spec examples/own-jsonl.toml --out my-compose.yml
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from deploy import appuser, commands


def add_deploy_parser(sub: Any) -> None:
    dep = sub.add_parser("deploy", help="multi-node deployment").add_subparsers(required=True, dest="deploy_cmd")

    comp = dep.add_parser("compose", help="generate docker-compose.yml from the launchers' command lines")
    comp.add_argument("--out", type=Path, default=None, help="default: docker-compose.yml at the repository root")
    comp.add_argument("--check", action="store_true", help="only check that the file is up to date")
    comp.add_argument("--spec", type=Path, help="a federation spec: its centres and their sources (examples/)")
    comp.add_argument("--nproc-per-centre", type=int, metavar="N",
                      help="data-parallel ranks in each centre's worker container (default: the spec's nproc, or 1)")
    comp.add_argument("--shard", action="store_true",
                      help="split each centre's model over its ranks (FSDP; needs --nproc-per-centre 2 or more)")
    comp.set_defaults(func=cmd_compose)

    up = dep.add_parser("up", help="docker-compose.yml: build, start, wait for the run, summary and verdict")
    up.add_argument("--offline", action="store_true",
                    help="no image registry: debootstrap base, cached wheels, Prometheus from Debian, no Grafana")
    up.add_argument("--no-build", action="store_true", help="use the image already built")
    up.add_argument("--project", default="bridgepool", help="compose project name (default bridgepool)")
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any [tool.flwr.app.config] key for the run, e.g. --set model=tiny")
    up.add_argument("--out", type=Path, help="where run.json and the residency report go "
                    "(default runs/compose-YYYYmmdd-HHMMSS)")
    up.add_argument("--timeout", type=float, default=7200, help="seconds to wait for the run")
    up.set_defaults(func=cmd_up)
    down = dep.add_parser("down", help="remove the compose project's containers, networks and volumes")
    down.add_argument("--project", default="bridgepool")
    down.set_defaults(func=cmd_down)

    reg = dep.add_parser("register", help="register SuperNode public keys at the SuperLink (idempotent)")
    reg.add_argument("--connection", default=commands.CONNECTION, help="[superlink.NAME] in $FLWR_HOME/config.toml")
    reg.add_argument("public_keys", nargs="+", metavar="KEY.pub")
    reg.set_defaults(func=cmd_register)

    ns = dep.add_parser("netns", help="run a federation with the server and each centre in its own namespaces")
    ns.add_argument("--spec", type=Path, help="a federation spec (examples/); default: the built-in demo's")
    ns.add_argument("--centres", type=int, default=3, help="without --spec: the first N demo centres")
    ns.add_argument("--rounds", type=int, help="default: the spec's; without --spec 2")
    ns.add_argument("--inner-steps", type=int, help="default: the spec's; without --spec 20")
    ns.add_argument("--model", help="tiny | small | base | large | xl; default: the spec's; without --spec tiny")
    ns.add_argument("--run-dir", type=Path, help="default: runs/netns-YYYYmmdd-HHMMSS")
    ns.add_argument("--base-port", type=int, default=commands.SUPERLINK_PORT,
                    help="SuperLink port (inside the server namespace); SuperNodes use the next ones")
    ns.add_argument("--max-bytes", type=int, default=None,
                    help="text per centre (0 = all; default: the spec's, 300 kB per demo centre)")
    ns.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any [tool.flwr.app.config] key, e.g. --set inner-lr=1e-3")
    ns.add_argument("--nproc-per-centre", type=int, metavar="N",
                    help="data-parallel ranks in each centre (default: the spec's nproc, or 1)")
    ns.add_argument("--app-user", default="auto", metavar="auto|none|USER", help=appuser.HELP)
    ns.add_argument("--shard", action="store_true",
                    help="split each centre's model over its ranks (FSDP; needs --nproc-per-centre 2 or more)")
    ns.set_defaults(func=cmd_netns)


def cmd_compose(args: argparse.Namespace) -> int:
    from deploy import compose
    from deploy.spec import BUILTIN_DEMO, load_spec

    args.out = args.out or compose.COMPOSE_FILE
    if args.spec is None and args.nproc_per_centre is None and not args.shard:
        return compose.main(args)
    spec = load_spec(args.spec) if args.spec is not None else load_spec(BUILTIN_DEMO).with_centres(3)
    if args.nproc_per_centre is not None:
        spec = spec.with_nproc(args.nproc_per_centre)
    if args.shard:
        spec = spec.with_shard()
    if args.check:
        return compose.main(args, centres=spec.sources(), config=spec.config, nproc=spec.nprocs(),
                            shard=spec.shards())
    return write_compose(spec, args.out)


def write_compose(spec: Any, out: Path) -> int:
    """docker-compose.yml for the spec's centres and sources (`deploy compose --spec`, `run` of a compose spec)."""
    from deploy import compose

    path = compose.write(out, spec.sources(), spec.config, spec.nprocs(), spec.shards())
    print(f"wrote {path} for {len(spec.centres)} centres of {spec.path}; start it with "
          f"`docker compose -f {path} up --build`")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from deploy.dockerup import cmd_up as up

    return up(args)


def cmd_down(args: argparse.Namespace) -> int:
    from deploy.dockerup import cmd_down as down

    return down(args)


def cmd_register(args: argparse.Namespace) -> int:
    from deploy.register import register_keys

    for line in register_keys(args.public_keys, connection=args.connection):
        print(line)
    return 0


def cmd_netns(args: argparse.Namespace) -> int:
    import dataclasses

    from deploy.cli import run_overrides
    from deploy.spec import BUILTIN_DEMO, load_spec

    if args.spec is not None:
        spec = load_spec(args.spec)
    else:  # the demo's centres, small: a quick look at the topology
        spec = load_spec(BUILTIN_DEMO).with_centres(args.centres)
        spec = dataclasses.replace(spec, name="netns", centres=tuple(
            dataclasses.replace(c, max_bytes=300_000) for c in spec.centres))
    if args.max_bytes is not None:
        spec = dataclasses.replace(spec, centres=tuple(
            dataclasses.replace(c, max_bytes=args.max_bytes) for c in spec.centres))
    spec = dataclasses.replace(spec, coordinator=dataclasses.replace(spec.coordinator, base_port=args.base_port))
    if args.nproc_per_centre is not None:
        spec = spec.with_nproc(args.nproc_per_centre)
    if args.shard:
        spec = spec.with_shard()
    run_dir = (args.run_dir or Path("runs") / time.strftime(f"{spec.name}-netns-%Y%m%d-%H%M%S")).resolve()
    quick = {"rounds": 2, "inner-steps": 20, "model": "tiny", "device": "cpu"} if args.spec is None else {}
    flags = {"rounds": args.rounds, "inner-steps": args.inner_steps, "model": args.model}
    overrides = {**quick, **{k: v for k, v in flags.items() if v is not None},
                 **run_overrides(argparse.Namespace(set=args.set, device=None))}
    return run_netns(spec, run_dir, spec.run_config(run_dir, overrides), args.app_user)


def run_netns(spec: Any, run_dir: Path, cfg: Any, app_user: str = "auto") -> int:
    """The spec's federation with the server and each centre in network namespaces of their own;
    `app_user`: deploy/appuser.py's choice of the user submitted bundles run as."""
    from rich.console import Console

    from deploy.live import summary_table
    from deploy.local import centre_dirs
    from deploy.netns import NetnsFederation, netns_available
    from deploy.processes import check_port_range
    from deploy.report import summary_rows
    from deploy.runner import check_devices, prepare_centres

    if why := netns_available():
        raise RuntimeError(why)
    check_port_range(spec.coordinator.base_port, len(spec.centres) + 1, "the SuperLink and the SuperNodes",
                     "--base-port")
    check_devices(spec, cfg)
    console = Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    centres = [centre_dirs(run_dir, c.name, c.device, c.threads, c.nproc, c.speed, c.shard) for c in spec.centres]
    prepare_centres(console, spec, run_dir)
    user, why = appuser.resolve(app_user, appuser.places([c.state_dir for c in centres], [c.socket for c in centres]))
    console.print(why)
    t0 = time.monotonic()
    with NetnsFederation(run_dir, centres, base_port=spec.coordinator.base_port, app_user=user) as fed:
        for where, ns in fed.namespaces.items():
            console.print(f"{where}: network namespace {ns}, address {fed.addresses[where]}")
        console.print(f"SuperLink on {fed.superlink_address} (TLS, SuperNode authentication); logs in {fed.logs}")
        run = fed.wait(fed.submit(cfg.to_mapping()), timeout=3600)
    if run.get("status") != "finished":
        raise RuntimeError(f"run failed: {run.get('message', 'see logs in ' + str(run_dir / 'logs'))}")
    console.print(summary_table(summary_rows(run), f"netns federation finished in {time.monotonic() - t0:.0f}s; "
                                                   "namespaces removed"))
    return 0
