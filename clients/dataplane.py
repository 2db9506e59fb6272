"""The centre's side of the data plane (server/dataplane.py): pull the global blob, push the update.

Only the centre's worker calls this: it is the one process of a centre that holds model bytes, so
every byte a centre sends on the data plane is one its egress guard has checked against the model's
manifest and written to its ledger first (clients/worker.py). Where it may send is the operator's
choice, not the run's: `Destination` (from `bridgepool centre serve --coordinator HOST
--data-plane-ca FILE`) refuses any other host, and plaintext where the operator gave a CA.

Standard library only (http.client, ssl), numpy for the buffers: the blob lands in one
preallocated buffer and each array is hashed once as it arrives (models/blob.py).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from models import blob

CHUNK = 4 << 20
MANIFEST_HEADER = "X-Bridgepool-Manifest"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class DataPlaneError(RuntimeError):
    """The data plane refused, failed or sent something that does not match its manifest.
    `status`: the server's HTTP status when it answered (410: the round is over)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Destination:
    """Where this centre's model bytes may go: `hosts` (the coordinator, set by the operator;
    loopback only by default, the single-machine demo) and the CA that must vouch for it."""

    hosts: tuple[str, ...] = LOOPBACK_HOSTS
    ca_file: str = ""
    timeout: float = 120.0  # seconds per socket operation

    def check(self, url: str) -> tuple[str, str, int]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
            raise DataPlaneError(f"data-plane URL {url!r} is not http(s)://HOST:PORT")
        if parts.hostname not in self.hosts and not (self.hosts == LOOPBACK_HOSTS and _loopback(parts.hostname)):
            raise DataPlaneError(f"data-plane host {parts.hostname!r} is not this centre's coordinator "
                                 f"({', '.join(self.hosts)}; `bridgepool centre serve --coordinator HOST`)")
        if self.ca_file and parts.scheme != "https":
            raise DataPlaneError(f"data-plane URL {url!r} is plaintext but this centre requires TLS "
                                 f"(--data-plane-ca {self.ca_file})")
        return parts.scheme, parts.hostname, parts.port

    def connect(self, url: str) -> http.client.HTTPConnection:
        scheme, host, port = self.check(url)
        if scheme == "https":
            ctx = ssl.create_default_context(cafile=self.ca_file or None)  # honours SSLKEYLOGFILE
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=ctx)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch(dest: Destination, url: str, token: str, manifest: str, allowed: blob.Shapes,
          into: blob.Pieces | None = None) -> dict[str, np.ndarray]:
    """The blob announced by `manifest` (JSON, from the Flower message), checked against `allowed`
    before allocation, hashed on arrival. Returns views into one new buffer; or, `into` (the
    model's own tensors, for a blob of one array of their size), lands in them and returns {}:
    no buffer, and no copy into the model after. If it fails, `into` holds part of the blob."""
    try:
        entries = blob.from_json(manifest)
        blob.check_against(entries, allowed)
    except blob.BlobError as err:
        raise DataPlaneError(f"the round's model manifest is not this model's: {err}") from err
    _, buffer = _get(dest, url, token, allowed, into, entries)
    return blob.split(buffer, entries) if into is None else {}


def fetch_ahead(dest: Destination, url: str, token: str, allowed: blob.Shapes, into: blob.Pieces) -> list[blob.Entry]:
    """The next round's model, read with a token granted ahead (server/dataplane.py `grant_ahead`) before
    its message has come: the server holds the request until the model is published. It lands in
    `into`, checked against `allowed` and hashed against the manifest the server sends with it; that
    manifest is returned, for the worker to compare with the one the round's Flower message announces
    (only then is the model the round's)."""
    return _get(dest, url, token, allowed, into, None)[0]


def _get(dest: Destination, url: str, token: str, allowed: blob.Shapes, into: blob.Pieces | None,
         announced: list[blob.Entry] | None) -> tuple[list[blob.Entry], np.ndarray]:
    """GET the blob; `announced`: the manifest it must be (None: the server's, checked against `allowed`)."""
    size = blob.total_bytes(announced) if announced is not None else 0
    if into is not None and announced is not None and not _lands_in(announced, into):
        raise DataPlaneError(f"the round's model ({size} bytes) is not one array of this model's {into.nbytes}")
    buffer = np.empty(size if into is None else 0, np.uint8)
    conn = dest.connect(url)
    try:
        conn.request("GET", "/v1/global", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise DataPlaneError(f"data plane refused the model download: {_reason(resp)}", resp.status)
        served = blob.from_json(resp.getheader(MANIFEST_HEADER) or "")
        if announced is None:
            blob.check_against(served, allowed)
            if into is None or not _lands_in(served, into):
                raise DataPlaneError("the data plane serves another model than this centre's")
            size = blob.total_bytes(served)
        elif served != announced:
            raise DataPlaneError("the data plane serves another model than the round's message announces")
        hasher, pos = blob.RegionHasher(served), 0
        for target in (into.views() if into is not None else [memoryview(buffer)]):
            done = 0
            while done < len(target):
                n = resp.readinto(target[done:done + CHUNK])
                if not n:
                    raise DataPlaneError(f"model download truncated at {pos} of {size} bytes")
                hasher.update(target[done:done + n])
                done, pos = done + n, pos + n
        hasher.verify()
    except DataPlaneError:
        raise
    except blob.BlobError as err:
        raise DataPlaneError(f"model download: {err}") from err
    except (OSError, http.client.HTTPException) as err:
        raise DataPlaneError(f"model download from {url} failed: {err}") from err
    finally:
        conn.close()
    return served, buffer


def _lands_in(entries: list[blob.Entry], into: blob.Pieces) -> bool:
    """Whether a blob of `entries` is one array of exactly the bytes of `into` (the model's tensors)."""
    return len(entries) == 1 and entries[0].nbytes == into.nbytes


def upload(dest: Destination, url: str, token: str, arrays: Mapping[str, blob.Array],
           entries: list[blob.Entry]) -> int:
    """Stream `arrays` (laid out as `entries`, already hashed: models/blob.py `layout`) to the
    coordinator's slot for `token`; returns the bytes sent once the server has verified them."""
    size = blob.total_bytes(entries)
    conn = dest.connect(url)
    try:
        conn.putrequest("PUT", "/v1/update", skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.putheader(MANIFEST_HEADER, blob.to_json(entries))
        conn.endheaders()
        try:
            for e in entries:
                for view in blob.views(arrays[e.name]):
                    conn.send(view)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass  # refused early: the server's answer says why
        resp = conn.getresponse()
        if resp.status != 200:
            raise DataPlaneError(f"data plane refused the update: {_reason(resp)}", resp.status)
        resp.read()
    except DataPlaneError:
        raise
    except (OSError, http.client.HTTPException) as err:
        raise DataPlaneError(f"update upload to {url} failed: {err}") from err
    finally:
        conn.close()
    return size


def _reason(resp: http.client.HTTPResponse) -> str:
    try:
        return f"{resp.status} {json.loads(resp.read(65536))['error']}"
    except (ValueError, KeyError, OSError):
        return f"{resp.status} {resp.reason}"
