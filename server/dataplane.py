"""The coordinator's data plane: model bytes at link speed, beside Flower's control plane.

Flower 1.41 moves a message as 5 MiB objects, one HTTP request each, re-hashed and stored whole at
every hop: ~54 MB/s for a 514 MB model on loopback, where TCP carries ~3 GB/s. So weights leave
Flower's messages. Each round the ServerApp publishes the global blob here and grants every centre
a token for that round (server/messaging.py); the Flower message carries the blob's manifest
(models/blob.py), this server's URL and the token. The centre's worker, the only process of a centre
that holds model bytes (clients/worker.py), pulls the blob and later streams its update back with the
same token, once the manifest has been checked against the model, hashing each array once as it
arrives: into a file of the run's spool (server/spool.py), so the coordinator's memory does not grow
with the number of centres, or into a buffer when no spool is given. The centre's Flower reply names
the upload's hashes; the ServerApp takes the upload only if they match (`take`).

Built from the standard library's threaded HTTP server and `ssl` (HTTP/1.0, one request per
connection, a body of known length): measured on loopback at >1 GB/s, where the hashing is the
limit, and no dependency to keep. Security is the control plane's: TLS with the deployment's
certificate when the SuperLink has one; a 256-bit token, unguessable and known only to the
ServerApp and the centre that Flower (with SuperNode authentication) delivered it to, bound to one
centre, one round, one blob to read and one slot to write, and expiring with the round. Without a
token nothing is served; a token cannot write another centre's slot.

    GET /v1/global   Authorization: Bearer TOKEN              -> the round's blob for this centre
    PUT /v1/update   Authorization: Bearer TOKEN, X-Bridgepool-Manifest: JSON, Content-Length: N
"""

from __future__ import annotations

import hmac
import http.server
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models import blob
from models.packing import BF16_KEY, INT8_BLOCK, INT8_KEY, PARAMS_KEY, SCALE_KEY
from server.spool import SpooledUpdate, clear_spool, open_spool

log = logging.getLogger("bridgepool.server")
CHUNK = 4 << 20  # bytes read and hashed at a time: large enough that the per-call cost vanishes
IDLE_SECONDS = 60.0  # a connection that sends nothing for this long is dropped (a stalled or hostile peer)
# A read granted ahead waits this long at most for its model to be published (below the centres' 120 s
# socket timeout); then 404, and the centre fetches with the next round's own token instead.
AHEAD_WAIT_SECONDS = 100.0
MANIFEST_HEADER = "X-Bridgepool-Manifest"


@dataclass
class Grant:
    """What one token allows: read `blob_id`, write one update of the `upload` shapes, until `expires`."""

    node: int
    round: int
    blob_id: str | None
    upload: blob.Shapes | None
    expires: float  # time.monotonic()
    received: tuple[list[blob.Entry], np.ndarray] | SpooledUpdate | None = None  # a whole, verified update
    busy: bool = False  # an upload is streaming in
    ended: bool = False  # its exchange is over: a late upload is answered 410 and not kept
    # Granted a round ahead (`grant_ahead`): the next round's model, read once, as soon as it is published.
    ahead: bool = False
    log: list[str] = field(default_factory=list)  # refusals, for the ServerApp's log


class DataPlaneServer:
    """Threaded HTTP(S) server holding published blobs and granted upload slots."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, certfile: str = "", keyfile: str = "",
                 spool: Path | None = None):
        """`spool`: a directory for the uploads (server/spool.py), so that the coordinator's memory does
        not grow with the number of centres; None keeps them in memory."""
        self.spool = open_spool(spool) if spool is not None else None
        self._seq = 0  # spool file names: unique within the run
        self._spares: list[Path] = []  # spool files of discarded updates, their pages cached: written over
        self._blobs: dict[str, tuple[list[blob.Entry], dict[str, np.ndarray]]] = {}
        self._grants: dict[str, Grant] = {}
        self._readers: dict[int, int] = {}  # id of a published array -> downloads of it under way
        self._lock = threading.RLock()  # discarding an update under it recycles its file (`_recycle`)
        self._published = threading.Condition(self._lock)  # wakes reads granted ahead (`grant_ahead`)
        self._closing = False
        self.ahead_wait = AHEAD_WAIT_SECONDS
        self.tls: ssl.SSLContext | None = None
        if certfile:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(certfile, keyfile or None)
            if os.environ.get("SSLKEYLOGFILE"):  # the canary capture decrypts with the session keys
                self.tls.keylog_filename = os.environ["SSLKEYLOGFILE"]
        self.bytes_served = 0
        self.bytes_received = 0
        self._httpd = _Server((host, port), _Handler, self)
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def start(self) -> DataPlaneServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="data-plane", daemon=True)
        self._thread.start()
        log.info("data plane listening on %s://%s:%d", self.scheme, self._httpd.server_address[0], self.port)
        return self

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            self._published.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            self._blobs.clear()
            self._grants.clear()
        if self.spool is not None:
            clear_spool(self.spool)

    def __enter__(self) -> DataPlaneServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the ServerApp's side
    def publish(self, blob_id: str, arrays: Mapping[str, np.ndarray]) -> list[blob.Entry]:
        """Serve `arrays` (kept by reference, not copied) as `blob_id`; returns its manifest."""
        entries = blob.layout(arrays)
        with self._lock:
            self._blobs[blob_id] = (entries, {k: np.ascontiguousarray(v) for k, v in arrays.items()})
            self._published.notify_all()
        return entries

    def grant(self, node: int, rnd: int, blob_id: str | None, upload: blob.Shapes | None, ttl: float) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._grants[token] = Grant(node, rnd, blob_id, upload, time.monotonic() + ttl)
        return token

    def grant_ahead(self, node: int, rnd: int, blob_id: str, ttl: float) -> str:
        """A token to read `blob_id`, round `rnd`'s model, once, before it exists: given with the round
        before's message, so the centre pulls the next model as soon as it is published, while Flower
        still carries the round's message (~1 s here). Its exchange does not end it: it is used up by
        one whole read, or expires."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._grants[token] = Grant(node, rnd, blob_id, None, time.monotonic() + ttl, ahead=True)
        return token

    def take(self, token: str, digests: Mapping[str, str]) -> dict[str, np.ndarray] | SpooledUpdate:
        """The verified update uploaded with `token`, if its hashes are `digests` (name -> hex, as the
        centre's Flower reply states them); blob.BlobError otherwise. The slot is emptied. With a
        spool, the update stays on disk (the caller discards it once aggregated)."""
        with self._lock:
            g = self._grants.get(token)
            got = g.received if g is not None else None
            if g is not None:
                g.received = None
        if got is None:
            why = "; ".join(g.log) if g is not None and g.log else "nothing was uploaded with its token"
            raise blob.BlobError(f"no update on the data plane ({why})")
        entries = got.entries if isinstance(got, SpooledUpdate) else got[0]
        if {e.name: e.digest for e in entries} != dict(digests):
            _discard(got)
            raise blob.BlobError("the update on the data plane is not the one the centre's reply names")
        return got if isinstance(got, SpooledUpdate) else blob.split(got[1], entries)

    def end_exchange(self) -> None:
        """Before a new exchange: drop every published blob and unclaimed update (memory), end every
        grant (a late upload is told its round is over, 410, and not kept), forget expired ones."""
        now = time.monotonic()
        with self._lock:
            self._blobs.clear()
            for token in [t for t, g in self._grants.items() if g.expires < now]:
                del self._grants[token]
            for g in self._grants.values():
                _discard(g.received)
                g.received = None
                g.ended = g.ended or not g.ahead  # a read granted ahead is for the exchange that follows

    # ------------------------------------------------------------ the handler's side
    def _grant_for(self, header: str | None) -> tuple[str, Grant]:
        token = header[7:].strip() if header and header.startswith("Bearer ") else ""
        with self._lock:
            found = next((g for t, g in self._grants.items() if hmac.compare_digest(t, token)), None) if token else None
        if found is None:
            raise _Refused(401, "unknown or missing token")
        if time.monotonic() > found.expires:
            raise _Refused(401, f"token for round {found.round} has expired")
        return token, found

    def serve_blob(self, handler: _Handler) -> None:
        _, g = self._grant_for(handler.headers.get("Authorization"))
        with self._lock:
            if g.ahead:  # wait for the model to be published: the round before is still aggregating
                if g.ended:
                    raise _Refused(410, f"the read granted ahead for round {g.round} was used")
                self._published.wait_for(lambda: (g.blob_id or "") in self._blobs or self._closing,
                                         timeout=max(0.0, min(self.ahead_wait, g.expires - time.monotonic())))
                g.ended = (g.blob_id or "") in self._blobs  # one read: the centre's own copy from here
            stored = self._blobs.get(g.blob_id or "")
        if stored is None:
            raise _Refused(404, f"no model to read with this token (round {g.round})")
        entries, arrays = stored
        keys = [id(a) for a in arrays.values()]
        with self._lock:  # the arrays are read until the last byte leaves: `reading` tells their owner
            for k in keys:
                self._readers[k] = self._readers.get(k, 0) + 1
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.send_header("Content-Length", str(blob.total_bytes(entries)))
            handler.send_header(MANIFEST_HEADER, blob.to_json(entries))
            handler.end_headers()
            for e in entries:
                handler.wfile.write(memoryview(arrays[e.name]).cast("B"))
        finally:
            with self._lock:
                for k in keys:
                    self._readers[k] -= 1
                    if not self._readers[k]:
                        del self._readers[k]
        with self._lock:
            self.bytes_served += blob.total_bytes(entries)

    def _recycle(self, path: Path) -> None:
        """A discarded update's file joins the spares (renamed: its name no longer says whose it was),
        unless the plane has stopped."""
        with self._lock:
            if self._closing or self.spool is None:
                path.unlink(missing_ok=True)
                return
            self._seq += 1
            spare = self.spool / f"spare-{self._seq}"
            os.rename(path, spare)
            self._spares.append(spare)

    def reading(self, array: np.ndarray) -> bool:
        """Whether a download of a blob that holds `array` (the object published) is still under way.
        Once `end_exchange` has withdrawn the blob, no new one can start: False then means the array
        is free to be written over."""
        with self._lock:
            return id(array) in self._readers

    def receive_update(self, handler: _Handler) -> dict[str, int]:
        token, g = self._grant_for(handler.headers.get("Authorization"))
        try:
            if g.upload is None:
                raise _Refused(403, "this token grants no upload")
            if g.ended:
                raise _Refused(410, f"round {g.round} is over: the update is no longer needed")
            entries = blob.from_json(handler.headers.get(MANIFEST_HEADER, ""))
            blob.check_against(entries, g.upload)  # before allocating a byte
            size = blob.total_bytes(entries)
            if int(handler.headers.get("Content-Length", -1)) != size:
                raise _Refused(400, f"Content-Length {handler.headers.get('Content-Length')} is not the "
                                    f"manifest's {size} bytes")
            with self._lock:
                if g.received is not None or g.busy:
                    raise _Refused(409, "an update was already uploaded with this token")
                g.busy = True
                self._seq += 1
                seq = self._seq
                spare = self._spares.pop() if self._spares else None
        except blob.BlobError as err:
            raise _Refused(400, str(err)) from err
        try:
            if self.spool is not None:
                path = self.spool / f"round{g.round}-node{g.node}-{seq}.update"
                if spare is not None:
                    os.rename(spare, path)
                received: tuple[list[blob.Entry], np.ndarray] | SpooledUpdate = _read_to_file(
                    handler, entries, size, path, reuse=spare is not None, recycle=self._recycle)
            else:
                received = (entries, _read_into(handler, entries, size))
        except (blob.BlobError, OSError) as err:
            g.log.append(str(err))
            raise _Refused(400, f"update refused: {err}") from err
        finally:
            g.busy = False
        with self._lock:
            if token in self._grants and not g.ended:  # not if the round ended meanwhile
                g.received = received
            else:
                _discard(received)
            self.bytes_received += size
        return {"bytes": size}


def _read_into(handler: _Handler, entries: list[blob.Entry], size: int) -> np.ndarray:
    """The body, read straight into a buffer of the announced size and hashed once on the way."""
    buffer = np.empty(size, np.uint8)
    view = memoryview(buffer)
    hasher = blob.RegionHasher(entries)
    pos = 0
    while pos < size:
        n = handler.rfile.readinto(view[pos:min(size, pos + CHUNK)])
        if not n:
            raise blob.BlobError(f"stream truncated at {pos} of {size} bytes")
        hasher.update(view[pos:pos + n])
        pos += n
    hasher.verify()
    return buffer


def _read_to_file(handler: _Handler, entries: list[blob.Entry], size: int, path: Path,
                  reuse: bool = False, recycle: Callable[[Path], None] | None = None) -> SpooledUpdate:
    """The body, hashed once on the way into an owner-only file of the spool: a new one, or (`reuse`)
    a spare written over from its start and cut to size. No file is left unless the whole blob
    arrived and every region matched its hash."""
    chunk = np.empty(min(size, CHUNK), np.uint8)  # the one chunk of this upload in memory
    view = memoryview(chunk)
    hasher = blob.RegionHasher(entries)
    fd = os.open(path, os.O_WRONLY | (0 if reuse else os.O_CREAT | os.O_EXCL), 0o600)
    try:
        pos = 0
        while pos < size:
            n = handler.rfile.readinto(view[:min(size - pos, CHUNK)])
            if not n:
                raise blob.BlobError(f"stream truncated at {pos} of {size} bytes")
            hasher.update(view[:n])
            written = 0
            while written < n:
                written += os.write(fd, view[written:n])
            pos += n
        hasher.verify()
        if reuse:
            os.ftruncate(fd, size)  # a spare of a larger form (fp32 before bf16) keeps no tail
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return SpooledUpdate(entries, path, recycle)


def _discard(received: object) -> None:
    if isinstance(received, SpooledUpdate):
        received.discard()


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, plane: DataPlaneServer):
        self.plane = plane
        super().__init__(address, handler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        super().server_bind()


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = IDLE_SECONDS  # per socket operation
    server: _Server

    def setup(self) -> None:
        if self.server.plane.tls is not None:  # handshake in this connection's thread, not the accept loop
            self.request.settimeout(IDLE_SECONDS)
            self.request = self.server.plane.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer("/v1/global", self.server.plane.serve_blob)

    def do_PUT(self) -> None:  # noqa: N802
        self._answer("/v1/update", self.server.plane.receive_update)

    def _answer(self, path: str, action) -> None:
        try:
            if self.path != path:
                raise _Refused(404, f"no such path {self.path!r}")
            result = action(self)
        except _Refused as err:
            log.warning("data plane refused %s %s from %s: %s", self.command, self.path, self.client_address[0], err)
            self._json(err.status, {"status": "error", "error": str(err)})
            self.close_connection = True
            return
        if result is not None:
            self._json(200, {"status": "ok", **result})

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the peer is gone (a truncated upload): nothing to tell it
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        log.debug("data plane %s: " + format, self.client_address[0], *args)


@dataclass
class Plane:
    """What a round's exchange needs of the data plane: the server, the URL centres dial, and the
    arrays a train reply may upload (the run's config decides which form)."""

    server: DataPlaneServer
    url: str
    upload: blob.Shapes


def upload_shapes(num_values: int, compression: str, wire_dtype: str) -> blob.Shapes:
    """The only update a centre may upload: new weights in fp32 or bf16, or the int8 pseudo-gradient."""
    if compression == "int8":
        return {INT8_KEY: ((num_values,), "int8"), SCALE_KEY: ((-(-num_values // INT8_BLOCK),), "float32")}
    if wire_dtype == "bf16":
        return {BF16_KEY: ((num_values,), blob.BF16)}
    return {PARAMS_KEY: ((num_values,), "float32")}


def open_plane(host: str, port: int, advertise: str, certfile: str, keyfile: str, upload: blob.Shapes,
               spool: Path | None = None) -> Plane:
    """Bind and start the data plane; a taken port or an unreadable certificate is named."""
    try:
        server = DataPlaneServer(host, port, certfile, keyfile, spool)
    except OSError as err:
        raise OSError(f"data plane: cannot listen on {host}:{port} ({err}); set data-plane-port to a free "
                      "port, or 0 for any") from err
    except ssl.SSLError as err:
        raise OSError(f"data plane: cannot load data-plane-certfile {certfile} / keyfile {keyfile}: {err}") from err
    server.start()
    return Plane(server, f"{server.scheme}://{advertise or host}:{server.port}", upload)
