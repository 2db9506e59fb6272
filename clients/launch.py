"""A centre's ranks launched and watched by torchrun (`torch.distributed.run`), from `centre serve --nproc N`.

`launch_argv` is torchrun's command line for this node's ranks (one node: a private rendezvous; several:
node `--node-rank` of a static rendezvous at node 0's `--rdzv-endpoint`, waiting at most `--rdzv-timeout`).
`supervise` runs that agent, relays its log, names what failed (`rendezvous_missing`: the node that never
came) and starts it again (`--max-restarts`). What runs inside each rank is clients/ranks.py.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("bridgepool.ranks")


def launch_argv(worker_argv: Sequence[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                rdzv_endpoint: str = "", rdzv_timeout: int = 300) -> list[str]:
    """torchrun's command line for a centre of `nnodes` x `nproc` ranks, each running `worker_argv`
    (a `python -m` module and its arguments). One node: a private rendezvous on a free loopback port
    (--standalone). Several: node `node_rank` of a static rendezvous at HOST:PORT (node 0 hosts it,
    and its rank 0 is the centre's worker). The agent's monitor interval leaves rank 0 time to reply
    to the round a dead rank broke before the agent stops it."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"--nproc {nproc}, --nnodes {nnodes}, --node-rank {node_rank}: need nproc >= 1, "
                         "nnodes >= 1 and 0 <= node-rank < nnodes")
    # The agent does not restart the ranks itself (--max-restarts 0): with torch 2.13 the ranks it
    # restarts fail to connect their gloo mesh ("connectFullMesh failed ... Connection refused",
    # reproduced with a 10-line script; pytorch/pytorch#167288 for nccl). `supervise` starts a
    # fresh agent instead, with a fresh rendezvous.
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--max-restarts", "0", "--monitor-interval", "5"]
    if nnodes == 1:
        argv += ["--standalone"]
    else:
        host, sep, port = rdzv_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--rdzv-endpoint {rdzv_endpoint!r}: a centre on {nnodes} nodes needs HOST:PORT of "
                             "its node 0 (the same on every node)")
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", host,
                 "--master-port", port, "--rdzv-conf", f"timeout={rdzv_timeout}"]
    return [*argv, "-m", *worker_argv]


def rendezvous_missing(line: str, centre: str, nproc: int, nnodes: int, node_rank: int, endpoint: str,
                       timeout: int) -> str | None:
    """What a line of torchrun's log says is missing when its static rendezvous timed out, naming the
    centre, the node(s) and their ranks; None for any other line. Node 0 hosts the rendezvous (a
    TCPStore waiting for every node's agent: "Timed out after T seconds waiting for clients. k/N
    clients joined."); a node > 0 dials it ("The client socket has timed out ... trying to connect")."""
    def ranks_of(first: int, last: int) -> str:
        low, high = first * nproc, (last + 1) * nproc - 1
        return f"rank {low}" if low == high else f"ranks {low}-{high}"

    joined = re.search(r"waiting for clients\. (\d+)/(\d+) clients joined", line)
    if joined:
        k = int(joined.group(1))
        who = (f"node 1 ({ranks_of(1, 1)})" if nnodes == 2 else
               f"nodes 1-{nnodes - 1} ({ranks_of(1, nnodes - 1)})" if k == 1 else
               f"{nnodes - k} of nodes 1-{nnodes - 1} ({ranks_of(1, nnodes - 1)})")
        return (f"centre {centre}: the rendezvous at {endpoint} timed out after {timeout} s (--rdzv-timeout) with "
                f"{k} of {nnodes} nodes: {who} never joined; start `centre serve` on the missing node(s) with "
                f"the same --rdzv-endpoint and their --node-rank")
    if "trying to connect to" in line and "timed out" in line:
        return (f"centre {centre}, node {node_rank}: node 0 ({ranks_of(0, 0)}, the centre's worker) did not "
                f"answer at the rendezvous {endpoint} within {timeout} s (--rdzv-timeout); start node 0 first, "
                "or check the endpoint")
    return None


def supervise(argv: Sequence[str], centre: str, restarts: int,
              explain: Callable[[str], str | None] = lambda _line: None) -> int:
    """Run torchrun's agent (`argv`) and start it again, up to `restarts` times, when the centre's
    ranks fail (a rank died, a rendezvous timed out); SIGTERM/SIGINT stop it and its ranks. The
    agent's log passes through, and `explain` turns a line of it into what failed (a rendezvous that
    timed out: `rendezvous_missing`), logged as the centre's error. A rendezvous waits at most its
    --rdzv-timeout, so a node that never comes fails the centre within (restarts + 1) x that, plus
    start-up. The agent's exit status, 0 once stopped on request."""
    proc: subprocess.Popen | None = None
    stopping = False
    reasons: list[str] = []

    def _relay(stream: Any) -> None:
        for line in stream:
            sys.stderr.write(line)
            reason = explain(line)
            if reason:
                reasons.append(reason)

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the agent stops its ranks, then exits

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    rc = 0
    for attempt in range(restarts + 1):
        reasons.clear()
        proc = subprocess.Popen(list(argv), stderr=subprocess.PIPE, text=True, errors="replace")
        relay = threading.Thread(target=_relay, args=(proc.stderr,), daemon=True)
        relay.start()
        rc = proc.wait()
        relay.join(10)  # the agent's last lines (its ranks may hold the pipe a moment longer)
        if stopping or rc == 0:
            return 0
        left = restarts - attempt
        then = f"starting them again ({left} restart(s) left)" if left else "no restarts left, giving up"
        if reasons:
            log.error("%s; %s", reasons[-1], then)
        else:
            log.error("centre %s: its ranks failed (torchrun exited with %d; its log above names the rank); %s",
                      centre, rc, then)
    return rc
