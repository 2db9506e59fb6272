"""TEST ONLY: a ClientApp that pries at its centre from inside the bundle (tests/test_redteam_bundle.py).

Before relaying each train request as the installed shell does, it tries what issue 19's
threats 3 and 8 say a submitted bundle must not be able to do: read the centre's corpus,
read and append to its egress ledger, list the run's state and write into the state
directory (tests/leaky_clientapp.py patches the runtime's check from inside its bundle).
It writes what each attempt gave into /tmp/<run-name>.probe/<centre>.json (a directory
the test makes writable for it), then returns the shell's honest reply: the run must
finish, relayed through the worker socket.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    out = Path("/tmp") / f"{context.run_config['run-name']}.probe" / f"{centre}.json"
    out.write_text(json.dumps(found))
    return shell.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return shell.evaluate(msg, context)


@app.query()
def prepare(msg: Message, context: Context) -> Message:
    return shell.prepare(msg, context)
