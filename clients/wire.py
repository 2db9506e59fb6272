"""Framing between a ClientApp and its centre's worker (local Unix socket).

A request or reply is two frames: a JSON header and a safetensors blob of named
arrays. numpy only (no torch, no pickle), so the per-round ClientApp process
starts fast and nothing executable crosses the socket.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

Arrays = dict[str, np.ndarray]


MAX_HEADER_BYTES = 1 << 20  # a JSON header: op, round, run config, broadcast labels


class WorkerError(RuntimeError):
    """The centre worker could not be reached or reported a failure."""


class WireError(RuntimeError):
    """A peer sent a frame over the size limit, or no complete message within the read timeout."""


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


def recv_counted(conn: Connection, max_bytes: int | None = None,
                 timeout: float | None = None) -> tuple[dict[str, Any], Arrays, int]:
    """`recv`, plus the bytes read (the counterpart of `send`'s return value).

    With `max_bytes`, a frame announcing more is refused from its length prefix, before
    anything is allocated; with `timeout`, the whole message must arrive within that many
    seconds (a peer that connects and sends nothing, or trickles, is cut off). Both raise
    WireError. The worker applies both (issue 19, threat 6); the ClientApp trusts its worker.
    """
    with _Deadline(conn, timeout):
        try:
            head = conn.recv_bytes(MAX_HEADER_BYTES if max_bytes is not None else None)
            body = conn.recv_bytes(max_bytes)
        except OSError as err:  # multiprocessing: "bad message length" for a frame above the limit
            raise WireError(f"a frame exceeds the limit of {max_bytes} bytes (header: {MAX_HEADER_BYTES}) "
                            f"or the connection failed ({err})") from None
        except EOFError:
            raise WireError("the peer closed the connection before a whole message arrived"
                            + (f" (or it took longer than the {timeout:g}s read timeout)" if timeout else "")) from None
    try:
        header = json.loads(head.decode())
        arrays = st_load(body) if body else {}
    except Exception as err:  # json's, UTF-8's, and safetensors' own error type
        raise WireError(f"a malformed message ({err.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise WireError("the message header is not a JSON object")
    return header, arrays, len(head) + len(body)


class _Deadline:
    """Shuts the connection's socket down after `timeout` seconds, which ends a blocked read
    with EOF: multiprocessing's recv_bytes has no timeout of its own."""

    def __init__(self, conn: Connection, timeout: float | None):
        self.conn, self.timeout = conn, timeout
        self.timer: threading.Timer | None = None

    def __enter__(self) -> _Deadline:
        if self.timeout is not None:
            self.timer = threading.Timer(self.timeout, self._cut)
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _cut(self) -> None:
        try:  # a duplicate of the descriptor: shutdown acts on the socket, which the read shares
            with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


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
