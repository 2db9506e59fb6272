"""Run a federation spec on this machine: `bridgepool run F` (deployment local) and `bridgepool demo`.

Order: everything that can be checked is checked before anything starts (the spec and its
run config, ports, GPUs, Prometheus), then each centre's corpus is prepared, then the
federation starts (deploy/local.py), the run is submitted and watched, and the residency
audit and the plots are written. With keep-metrics the federation and Prometheus stay up
after the run until Ctrl-C, so the final metrics can be looked at.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
import urllib.parse
from pathlib import Path
from typing import Any

from deploy import appuser
from deploy.processes import check_port_free, check_port_range
from deploy.spec import FederationSpec, SpecError
from models.config import ConfigError, RunConfig

# What to look at once a run is over (Prometheus keeps the ServerApp's series after its endpoint is gone).
QUERIES = ("sum by (centre) (bridgepool_tokens_total)", "bridgepool_eval_loss", "bridgepool_train_loss",
           "sum(rate(bridgepool_tokens_total[30s]))", "max_over_time(bridgepool_round_duration_seconds_sum[1h])",
           "max_over_time(bridgepool_utilisation[1h])")


def check_ports(spec: FederationSpec, free: bool = True) -> None:
    """Every port the local federation needs is a TCP port, the ranges do not overlap, and (`free`)
    nothing listens there yet: checked before any data is prepared or process started."""
    n, co = len(spec.centres), spec.coordinator
    # The SuperLink, each SuperNode's runtime API, then the ServerApp's data plane (deploy/local.py).
    check_port_range(co.base_port, n + 2, f"the SuperLink, {n} SuperNode(s) and the data plane", "--base-port")
    ranges = {"--base-port": range(co.base_port, co.base_port + n + 2)}
    if co.metrics_port:
        check_port_range(co.metrics_port, n + 1, "the server's and each centre's metrics endpoint", "--metrics-port")
        ranges["--metrics-port"] = range(co.metrics_port, co.metrics_port + n + 1)
    if co.prometheus_port:
        ranges["--prometheus-port"] = range(co.prometheus_port, co.prometheus_port + 1)
    flags = list(ranges)
    for i, a in enumerate(flags):
        for b in flags[i + 1:]:
            if set(ranges[a]) & set(ranges[b]):
                raise SpecError(f"{a} {ranges[a][0]} (ports {ranges[a][0]}-{ranges[a][-1]}) and {b} {ranges[b][0]} "
                                f"(ports {ranges[b][0]}-{ranges[b][-1]}) overlap; move one of them")
    if free:
        names = ["SuperLink", *(f"SuperNode runtime API of {c.name}" for c in spec.centres),
                 "the ServerApp's data plane"]
        for port, what in zip(ranges["--base-port"], names, strict=True):
            check_port_free(port, what)
        for port, who in zip(ranges.get("--metrics-port", []), ["the server", *(c.name for c in spec.centres)],
                             strict=False):
            check_port_free(port, f"metrics endpoint of {who}", flag="--metrics-port")
        if co.prometheus_port:
            check_port_free(co.prometheus_port, "Prometheus", flag="--prometheus-port")


def check_devices(spec: FederationSpec, cfg: RunConfig) -> None:
    """A centre asked to train on CUDA on a machine whose torch sees no GPU fails now, not in round 1."""
    wants = [c.name for c in spec.centres if (c.device or cfg.device) == "cuda"]
    if not wants:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device 'cuda' asked for ({', '.join(wants)}) but torch sees no CUDA GPU on this machine "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                          "use --device cpu (or auto), or device = \"cpu\" in the spec")


def check_prometheus(spec: FederationSpec) -> None:
    if spec.coordinator.prometheus_port and not shutil.which("prometheus"):
        raise ConfigError("--prometheus-port needs the `prometheus` binary (Debian: apt-get install prometheus)")


def run_local(spec: FederationSpec, run_dir: Path, cfg: RunConfig, app_user: str = "auto") -> int:
    """Prepare the centres' data, run the federation, report; raises on a failed run (exit 2)."""
    from rich.console import Console

    from deploy.live import LiveView, summary_table
    from deploy.local import LocalFederation, centre_dirs
    from deploy.report import plot_run, summary_rows

    console = Console()
    check_ports(spec)
    check_devices(spec, cfg)
    check_prometheus(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    centres = [centre_dirs(run_dir, c.name, c.device, c.threads, c.nproc, c.speed, c.shard) for c in spec.centres]
    prepare_centres(console, spec, run_dir)
    user, why = appuser.resolve(app_user, appuser.places([c.state_dir for c in centres], [c.socket for c in centres]))
    console.print(why)

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    co = spec.coordinator
    steps = (f"{cfg.round_seconds:g} s of training per centre ({cfg.min_inner_steps}-{cfg.max_inner_steps} steps)"
             if cfg.budgeted else f"{cfg.inner_steps} inner steps")
    slow = [f"{c.name} at speed {c.speed:.3g}" for c in spec.centres if c.speed < 1]
    console.print(f"[bold]bridgepool[/] {spec.path.name}: {len(centres)} centres, {cfg.rounds} rounds x {steps}, "
                  f"model {cfg.model}, strategy {cfg.strategy}{'; emulated ' + ', '.join(slow) if slow else ''}; "
                  f"run directory {run_dir}")
    with LocalFederation(run_dir, centres, base_port=co.base_port, metrics_port=co.metrics_port,
                         app_user=user) as fed, \
            contextlib.ExitStack() as stack:
        console.print(f"SuperLink on 127.0.0.1:{fed.superlink_port}; logs in {fed.logs}")
        prom = _start_monitoring(console, fed, stack, co.prometheus_port)
        flwr_run = fed.submit(cfg.to_mapping())
        with LiveView(console, cfg.rounds, [c.name for c in centres]) as view:
            run = fed.wait(flwr_run, on_tick=view.update)
        wall = time.monotonic() - t0
        audit_run(console, run_dir)  # also for a failed run: a blocked egress is one way to fail
        failed = run.get("status") != "finished"
        if not failed:
            pngs = plot_run(run_dir)
            console.print(summary_table(summary_rows(run), f"{spec.name} finished in {wall:.0f}s"))
            console.print(f"final model: {run['final']['model']}\nrun record:  {run_dir / 'run.json'}\n"
                          f"plots:       {', '.join(str(p) for p in pngs)}\ncheckpoints: {run_dir / 'checkpoints'}")
        if co.keep_metrics:
            if failed:
                console.print(f"[red]run failed[/]: {run.get('message', '')}")
            keep_until_interrupted(console, fed, prom)
    if failed:
        raise RuntimeError(f"run failed: {run.get('message', 'see logs in ' + str(run_dir / 'logs'))}")
    return 0


def prepare_centres(console: Any, spec: FederationSpec, run_dir: Path) -> None:
    from clients.data import prepare_centre
    from deploy.local import centre_dirs

    for c in spec.centres:
        data_dir = centre_dirs(run_dir, c.name).data_dir
        if (data_dir / "manifest.json").exists():
            continue  # prepared earlier (e.g. a resumed run): never rebuilt under a running centre
        m = prepare_centre(c.source, data_dir, max_bytes=c.max_bytes or None, undecodable=c.undecodable)
        console.print(f"prepared {c.name} from {c.source}: {describe(m)}")


def describe(manifest: dict) -> str:
    splits = manifest.get("splits", {})
    text = ", ".join(f"{name} {s['documents']} documents / {s['bytes'] / 1e6:.2f} MB" for name, s in splits.items())
    skipped = manifest.get("skipped-undecodable-files", 0)
    return text + (f"; skipped {skipped} file(s) that are not UTF-8" if skipped else "")


def _start_monitoring(console: Any, fed: Any, stack: contextlib.ExitStack, prometheus_port: int) -> Any:
    """Print the metrics endpoints; start Prometheus on them if asked (stopped with the run)."""
    from deploy.prometheus import Prometheus

    for who, url in fed.metrics_endpoints().items():
        console.print(f"metrics of {who}: {url}")
    if not fed.metrics_port:
        return None
    config = fed.run_dir / "prometheus.yml"
    if not prometheus_port:
        console.print(f"scrape config: {config} (`prometheus --config.file {config}`, or --prometheus-port)")
        return None
    prom = stack.enter_context(Prometheus(config, fed.run_dir / "prometheus", prometheus_port,
                                          fed.logs / "prometheus.log"))
    console.print(f"Prometheus: {prom.url} (try `sum(rate(bridgepool_tokens_total[30s]))`)")
    return prom


def graph_url(base: str, expr: str) -> str:
    """Prometheus' own graph page for `expr`, the last 15 minutes."""
    return f"{base}/graph?" + urllib.parse.urlencode({"g0.expr": expr, "g0.tab": "0", "g0.range_input": "15m"})


def keep_until_interrupted(console: Any, fed: Any, prom: Any) -> None:
    """keep-metrics: the centres' endpoints and Prometheus (with the ServerApp's scraped series)
    stay up until Ctrl-C; prints where to look."""
    lines = ["[bold]keeping the metrics up until Ctrl-C[/] (keep-metrics)"]
    lines += [f"  {who}: {url}" for who, url in fed.metrics_endpoints().items() if who != "the server"]
    lines.append("  the server's endpoint closed with its run; Prometheus holds what it served")
    if prom is not None:
        lines.append(f"  Prometheus: {prom.url}  - queries to open:")
        lines += [f"    {expr}\n      {graph_url(prom.url, expr)}" for expr in QUERIES]
    console.print("\n".join(lines), soft_wrap=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(1.0)
    console.print("Ctrl-C: stopping every process the run started")


def audit_run(console: Any, run_dir: Path) -> dict:
    from deploy.audit import summary, write_report

    js, md, report = write_report(run_dir)
    console.print(f"{summary(report)}\nresidency:   {md} (and {js.name})")
    return report
