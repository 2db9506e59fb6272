"""The app host: a submitted bundle's ClientApp, run in a process of its own (issue 19, threats 3 and 7).

The centre's runtime (clients/runtime.py) is the operator's installed code and the only
part of the centre that talks to the SuperNode. A submitted bundle's ClientApp runs
here instead, one process per bundle hash, started by the runtime (as the operator's
`--app-user`, when one is given). It gets each task's message and context over a pipe
and returns only the reply's content, or the exception it raised; it holds no runtime
token, so it cannot push a reply, and whatever it returns is checked by the runtime
against the worker's own record before anything leaves. Patching the runtime's check
from inside the bundle changes nothing: it runs in another process.

With `--app-user`, this process starts as root (the interpreter may lie where only root reads,
as a pyenv under /root does) and becomes that user before the bundle's code runs: the bundle
can import what was loaded before (Flower's ClientApp machinery, numpy, safetensors and the
installed shell `clients.app`) and its own files, and read nothing of the centre's. As root with an
app user, the runtime also starts it under `unshare --net` (clients/appnet.py): it has no network,
only its pipes and the worker's socket file.

A new bundle (another hash) gets a new process: one run's threads and patches die with
its process instead of living on into the next run's tasks.

    python -m clients.apphost --fab-id ID --fab-version V --fab-hash H --in-fd N --out-fd M
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import threading
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.supercore.utils import get_flwr_home

from clients import wire

log = logging.getLogger("bridgepool.apphost")


def _task(app: ClientApp, tx: Connection, lock: threading.Lock, header: dict[str, Any],
          arrays: wire.Arrays) -> None:
    head: dict[str, Any] = {"id": header["id"]}
    out: wire.Arrays = {}
    try:
        message = message_from_proto(ProtoMessage.FromString(arrays["message"].tobytes()))
        context = context_from_proto(ProtoContext.FromString(arrays["context"].tobytes()))
        reply = app(message=message, context=context)
        if reply.has_error():
            head.update(status="raised", type="Error", text=str(reply.error.reason), load=False)
        else:
            head["status"] = "ok"
            out["content"] = np.frombuffer(recorddict_to_proto(reply.content).SerializeToString(), np.uint8)
    except Exception as ex:  # told to the runtime, which decides what of it may leave
        log.error("ClientApp raised an exception", exc_info=ex)
        head.update(status="raised", type=type(ex).__name__, text=str(ex), load=isinstance(ex, LoadClientAppError))
    with lock:
        wire.send(tx, head, out)


def drop_to(user: str) -> None:
    """Become `user` for good (groups, gid, uid: root's capabilities go with the uid) before any of the
    bundle's code runs. This process starts as root so that it can start at all where the interpreter
    lies in a directory only root reads (a pyenv under /root); what the installed shell and Flower need
    is imported before the drop, the bundle's own files are read after it (they are world-readable)."""
    import clients.app  # noqa: F401  - the installed shell a bundle builds on, with numpy and safetensors

    entry = pwd.getpwnam(user)
    home = str(get_flwr_home())  # where the runtime installed the bundle
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise SystemExit(f"could not become {user}")
    os.chdir(home)
    os.environ["HOME"] = home
    log.info("app host runs as %s (uid %d)", user, entry.pw_uid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.apphost", description=__doc__.split("\n")[0])
    for flag in ("--fab-id", "--fab-version", "--fab-hash"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--in-fd", type=int, required=True, help="pipe the runtime writes tasks to")
    parser.add_argument("--out-fd", type=int, required=True, help="pipe this process writes replies to")
    parser.add_argument("--user", default=None, help="run the bundle as this user (this process starts as root)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rx, tx = Connection(args.in_fd, writable=False), Connection(args.out_fd, readable=False)
    lock = threading.Lock()
    if args.user:
        drop_to(args.user)
    try:
        app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            args.fab_id, args.fab_version, args.fab_hash)
    except Exception as ex:  # every task of this bundle then fails with the loading error
        log.error("could not load the bundle's ClientApp", exc_info=ex)
        app = None
        failure = {"status": "raised", "type": type(ex).__name__, "text": str(ex), "load": True}
    log.info("app host for bundle %s (%s %s) ready", args.fab_hash[:12], args.fab_id, args.fab_version)
    while True:
        try:
            header, arrays = wire.recv(rx)
        except (EOFError, wire.WireError):  # the runtime closed the pipe: this bundle is done with
            return
        if app is None:
            with lock:
                wire.send(tx, {"id": header["id"], **failure})
            continue
        # Each task in a thread, as the runtime runs them: one stuck task does not hold up the next.
        threading.Thread(target=_task, args=(app, tx, lock, header, arrays), daemon=True,
                         name=f"task-{header['id']}").start()


if __name__ == "__main__":
    main()
