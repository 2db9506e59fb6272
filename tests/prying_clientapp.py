"""TEST ONLY: a ClientApp that pries at its centre from inside the bundle (tests/test_redteam_bundle.py).

Before relaying each train request as the installed shell does, it tries what issue 19's
threats 3 and 8 say a submitted bundle must not be able to do: read the centre's corpus,
read and append to its egress ledger, list the run's state and write into the state
directory (tests/leaky_clientapp.py patches the runtime's check from inside its bundle).
Then it tries the network: a TCP connection to the coordinator's data plane (the URL
in the round's message, where its token would let it upload bytes of its own choosing),
to a port the test listens on at 127.0.0.1 (its number in /tmp/<run-name>.probe/listen.json),
the same port by name ("localhost" resolved) and a UDP datagram to it. It writes what each
attempt gave into /tmp/<run-name>.probe/<centre>.json (a directory the test makes writable
for it), then returns the shell's honest reply: the run must finish, relayed through the
worker socket.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import app as shell

app = ClientApp()


def _try(action) -> str:
    try:
        action()
        return "done"
    except OSError as err:
        return type(err).__name__


def _net(action) -> str:
    """"connected" (or "sent"), or the error's class and errno name: what the bundle's network allowed."""
    try:
        return action()
    except OSError as err:
        return f"{type(err).__name__}:{errno.errorcode.get(err.errno, err.errno)}"


def _connect(host: str, port: int) -> str:
    socket.create_connection((host, port), timeout=5).close()
    return "connected"


def _by_name(port: int) -> str:
    family, kind, proto, _, address = socket.getaddrinfo("localhost", port, socket.AF_INET, socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.settimeout(5)
        s.connect(address)
    return "connected"


def _datagram(port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"bundle-was-here", ("127.0.0.1", port))
    return "sent"


def network(msg: Message, probe: Path) -> dict[str, str]:
    listen = int(json.loads((probe / "listen.json").read_text())["port"])
    plane = urlsplit(str(msg.content["config"]["dp-url"]))
    return {"netns": os.readlink("/proc/self/ns/net"),
            "connect-data-plane": _net(lambda: _connect(plane.hostname, plane.port)),
            "connect-listener": _net(lambda: _connect("127.0.0.1", listen)),
            "resolve-connect-listener": _net(lambda: _by_name(listen)),
            "udp-listener": _net(lambda: _datagram(listen))}


@app.train()
def train(msg: Message, context: Context) -> Message:
    centre = str(context.node_config["centre"])
    state = Path(str(context.node_config["worker-socket"])).parent  # deploy/local.py layout
    ledger = state / "egress-ledger.jsonl"
    found = {
        "uid": os.getuid(),
        "read-data": _try(lambda: (state.parent / "data" / "manifest.json").read_bytes()),
        "list-data": _try(lambda: list((state.parent / "data").iterdir())),
        "read-ledger": _try(ledger.read_bytes),
        "write-ledger": _try(lambda: ledger.open("a").close()),
        "list-run-state": _try(lambda: list((state / str(context.run_config["run-name"])).iterdir())),
        "write-state": _try(lambda: (state / "planted").write_text("x")),
    }
    probe = Path("/tmp") / f"{context.run_config['run-name']}.probe"
    (probe / f"{centre}.json").write_text(json.dumps({**found, **network(msg, probe)}))
    return shell.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return shell.evaluate(msg, context)


@app.query()
def prepare(msg: Message, context: Context) -> Message:
    return shell.prepare(msg, context)
