"""The centre worker's Unix socket: how the ClientApp shell (and the centre's runtime) reach
`CentreWorker.handle` (clients/worker.py), one request at a time.

The socket is the centre's own boundary, so this part is about who may connect and how much
they may send: the socket is created with its final mode (0600, or 0660 for the bundles' group)
by the umask set before `bind`; each frame is bounded in size and time by the centre's policy; the
caller's uid is the kernel's word (SO_PEERCRED), not the request's. Each request's log line says
where its time went (the worker's `Phases`).
"""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import struct
import time
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

from clients import wire
from clients.worker import CentreWorker
from models.memory import release_freed_memory

log = logging.getLogger("bridgepool.centre")


def peer_uid(conn: Any) -> int:
    """The uid of the process at the other end of a Unix socket connection (SO_PEERCRED: the kernel's word)."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    return uid


def serve(worker: CentreWorker, socket_path: Path, group: str | None = None) -> None:
    """Answer requests one at a time until SIGTERM/SIGINT. The socket is created 0600 (only the
    worker's user may relay), or 0660 for the members of `group` (the user the centre's runtime
    runs submitted bundles as: `--app-user`), with the mode set by the umask before `bind`, so it
    never exists with a wider one."""
    release_freed_memory()  # a round's freed gradients and buffers leave resident memory (models/memory.py)
    socket_path = Path(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        socket_path.unlink()  # stale socket of a previous worker
    stop = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    limit = worker.policy.message_limit  # bytes per frame on the socket: the largest model + margin by default
    gid = grp.getgrnam(group).gr_gid if group else -1  # an unknown group fails here, naming it (KeyError)
    previous = os.umask(0o117 if group else 0o177)
    try:
        listener = Listener(str(socket_path), family="AF_UNIX")
    finally:
        os.umask(previous)
    if group:
        os.chown(socket_path, -1, gid)
    with listener:
        log.info("[%s] worker ready on %s", worker.centre, socket_path)
        try:
            while not stop:
                with listener.accept() as conn:
                    t0 = time.perf_counter()
                    try:  # bounded in size and time (the policy's): a hostile client is dropped, not served
                        header, arrays, received = wire.recv_counted(conn, limit, worker.policy.read_timeout)
                    except wire.WireError as err:
                        log.warning("[%s] dropped a client of the worker socket: %s", worker.centre, err)
                        continue
                    try:
                        reply, out = worker.handle(header, arrays, peer_uid(conn))
                    except Exception as err:  # reported to the ClientApp, worker stays up
                        log.exception("[%s] request failed", worker.centre)
                        reply, out = {"status": "error", "error": f"[{worker.centre}] {err}"}, {}
                        worker.vouch(f"centre worker failed: {reply['error']}", error=True)  # wire.call's words
                    try:
                        sent = wire.send(conn, reply, out)
                    except OSError as err:  # the client left before its reply: the worker keeps serving
                        log.warning("[%s] could not send the %s reply: %s", worker.centre, header.get("op"), err)
                        sent = 0
                    worker.after_reply()
                    if isinstance(header.get("run-config"), dict):  # a run's request, not a health check
                        run = str(header["run-config"].get("run-name", ""))[:64]
                        plane_in, plane_out = worker.plane_bytes  # the model's bytes moved on the data plane
                        worker.metrics.record_exchange(run, t0, time.perf_counter(), received + plane_in,
                                                       sent + plane_out)
                    worker.plane_bytes = [0, 0]
                    log.info("[%s] %s round %s in %.2fs (%s)", worker.centre, header.get("op"),
                             header.get("round"), time.perf_counter() - t0, worker.phases)
        except KeyboardInterrupt:
            log.info("[%s] worker stopping", worker.centre)
