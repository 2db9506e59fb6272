"""Framing between a ClientApp and its centre's worker (local Unix socket).

A request or reply is two frames: a JSON header and a safetensors blob of named
arrays. numpy only (no torch, no pickle), so the per-round ClientApp process
starts fast and nothing executable crosses the socket.
"""

from __future__ import annotations

import json
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

Arrays = dict[str, np.ndarray]


class WorkerError(RuntimeError):
    """The centre worker could not be reached or reported a failure."""


def send(conn: Connection, header: dict[str, Any], arrays: Arrays | None = None) -> int:
    """Send one message; returns the bytes written (for accounting)."""
    head = json.dumps(header).encode()
    body = st_save({k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}) if arrays else b""
    conn.send_bytes(head)
    conn.send_bytes(body)
    return len(head) + len(body)


def recv(conn: Connection) -> tuple[dict[str, Any], Arrays]:
    header, arrays, _ = recv_counted(conn)
    return header, arrays


def recv_counted(conn: Connection) -> tuple[dict[str, Any], Arrays, int]:
    """`recv`, plus the bytes read (the counterpart of `send`'s return value)."""
    head = conn.recv_bytes()
    body = conn.recv_bytes()
    return json.loads(head.decode()), (st_load(body) if body else {}), len(head) + len(body)


def call(socket_path: str | Path, header: dict[str, Any], arrays: Arrays | None = None,
         timeout: float = 3600.0) -> tuple[dict[str, Any], Arrays]:
    """One request/reply round trip to the worker listening on `socket_path`."""
    try:
        conn = Client(str(socket_path), family="AF_UNIX")
    except (FileNotFoundError, ConnectionRefusedError) as err:
        raise WorkerError(
            f"centre worker socket {socket_path} is not answering ({err.__class__.__name__}); "
            "start it with `bridgepool centre serve ...` or check its log"
        ) from err
    with conn:
        send(conn, header, arrays)
        if not conn.poll(timeout):
            raise WorkerError(f"centre worker at {socket_path} did not reply within {timeout:.0f}s")
        reply, out = recv(conn)
    if reply.get("status") != "ok":
        raise WorkerError(f"centre worker failed: {reply.get('error', 'unknown error')}")
    return reply, out
