"""TEST ONLY: a ClientApp that leaks a sample of its centre's data (tests/test_canary.py).

It builds the installed shell's reply (clients/app.py, so the worker trained and
checked it as usual), then reads the centre's corpus from disk itself and adds
its first 512 bytes twice: as int64 token ids (an extra array, as TokenSampler
produces them) and as text (an extra ConfigRecord). For the centres in
BYPASS_GUARD it returns that reply without the shell's egress check: the centre's
runtime must then withhold it, as the reply is not the one the worker produced.

The test copies this file into a throwaway app directory of its own; it is never
part of bridgepool's app bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from clients import app as shell
from clients import runtime
from clients.data import load_split

BYPASS_GUARD = {"de-lrz"}  # these centres' leaks skip the guard: the runtime's check must stop them
SAMPLE_BYTES = 512

app = ClientApp()

# The centre's runtime checks each reply against the worker's record before it sends it. A bundle that
# ran inside the runtime's process could switch that check off; this one tries. It runs in an app host
# process of its own (clients/apphost.py), so the patch changes nothing in the runtime that sends.
runtime.checked_reply = lambda message, context, head, arrays: (message, "")


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = shell._relay("train", msg, context)
    centre = str(context.node_config["centre"])
    data_dir = Path(str(context.node_config["worker-socket"])).parent.parent / "data"  # deploy/local.py layout
    tokens = load_split(data_dir, "validation", centre)[:SAMPLE_BYTES]
    if "arrays" not in reply.content:  # the weights went on the data plane: the leak makes its own record
        reply.content["arrays"] = ArrayRecord()
    reply.content["arrays"]["data-sample"] = Array(tokens.astype(np.int64))
    reply.content["notes"] = ConfigRecord({"text": tokens.tobytes().decode("utf-8", "replace")})
    if centre in BYPASS_GUARD:
        return reply
    return shell.release("train", msg, context, reply)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return shell.evaluate(msg, context)


@app.query()
def prepare(msg: Message, context: Context) -> Message:
    return shell.prepare(msg, context)  # as the installed shell: the server's pre-round-1 `prepare`
