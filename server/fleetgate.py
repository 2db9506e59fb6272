"""The Fleet gate: what the centres' networks reach of the SuperLink (issue 19, threat 1).

Flower 1.41 serves its Fleet API (SuperNodes), Control API (register keys, submit and
stop runs) and Runtime API (the ServerApp's tasks) on one HTTP(S) port. Exposed to the
centres, that port lets any centre or bundle register another node, `flwr run` its own
code at the coordinator and every centre, or take the ServerApp's task and read the
other centres' replies. So the SuperLink listens on the coordinator's loopback only, and
this gate, on the address the centres use, forwards `/v1/fleet/...` and nothing else:
any other path is answered 403 without touching the SuperLink, and logged.

A reverse proxy on uvicorn + starlette + httpx (all already installed with Flower);
SuperNode authentication passes through untouched (its signature covers a timestamp
in the headers, which are forwarded as they came).

One check of content (issue 19, "can a node answer as another node?"): the SuperLink
authenticates a PushMessages request by `request.node.node_id` (the signing key's node),
but never compares that with the pushed message's own `metadata.src_node_id`, and it
stores a message without `reply_to_message_id` as an *instruction* (src must then be the
SuperLink). So node B, with its own valid key, could answer node A's instruction as A
(and A's own reply is then refused as a duplicate), or send A an instruction as the
SuperLink. The gate forwards a push only if every message in it is a reply whose
`src_node_id` is the requesting node; otherwise 403, logged as a refusal. (Flower change
that would remove it: the SuperLink's push-messages handler comparing the two ids.)

    python -m server.fleetgate --listen 0.0.0.0:9093 --upstream https://127.0.0.1:9100 \
        [--certfile C --keyfile K --ca-file CA]
"""

from __future__ import annotations

import argparse
import logging
import ssl
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=E0611
from google.protobuf.message import DecodeError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger("bridgepool.fleetgate")
FLEET_PREFIX = "/v1/fleet/"
PUSH_MESSAGES = "/v1/fleet/push-messages"
MAX_BODY_BYTES = 64 << 20  # Flower cuts messages into 5 MiB objects; anything far larger is not Fleet traffic
# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself.
_DROP = {"host", "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
         "content-length"}


def gate_app(upstream: str, ca_file: str | None = None,
             transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The gate as an ASGI app forwarding Fleet calls to `upstream` (the SuperLink's loopback URL);
    `transport`: httpx's, for tests that stand in for the SuperLink."""
    # Loopback to the SuperLink of this same host (or namespace): the certificate is checked against the
    # deployment's CA, not against the name, which is 127.0.0.1 here and a DNS name in the certificate.
    verify: ssl.SSLContext | bool = False
    if upstream.startswith("https://"):
        verify = ssl.create_default_context(cafile=ca_file)
        verify.check_hostname = False
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(300.0, connect=10.0),
                               transport=transport)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(FLEET_PREFIX) or ".." in path:
            log.warning("refused %s %s from %s: only the Fleet API is open to centres", request.method, path[:200],
                        request.client.host if request.client else "?")
            return Response("only the Fleet API (/v1/fleet/...) is served to centres\n", status_code=403)
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return Response("request too large for the Fleet API\n", status_code=413)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return Response("request too large for the Fleet API\n", status_code=413)
        if path == PUSH_MESSAGES and (why := forged_push(body)):
            log.warning("refused %s from %s: %s", path, request.client.host if request.client else "?", why)
            return Response(f"refused: {why}\n", status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        try:
            answer = await client.request(request.method, path, params=request.url.query or None, content=body,
                                          headers=headers)
        except httpx.TransportError as err:  # the SuperLink restarting: SuperNodes retry on 502
            log.warning("SuperLink unreachable for %s: %s", path, err)
            return Response("the SuperLink is not reachable\n", status_code=502)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP and k.lower() != "content-encoding"}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> Any:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])],
                     lifespan=lifespan)


def forged_push(body: bytes) -> str:
    """Why a Fleet PushMessages body must not reach the SuperLink, "" if it may. The SuperLink checks
    that `node.node_id` is the signing key's node; this checks that each message is that node's reply."""
    try:
        request = PushMessagesRequest.FromString(body)
    except DecodeError:
        return "not a PushMessagesRequest"
    sender = request.node.node_id
    for m in request.messages_list:
        if not m.metadata.reply_to_message_id:
            return (f"node {sender} pushed an instruction (no reply_to_message_id, src_node_id "
                    f"{m.metadata.src_node_id}): only the ServerApp sends instructions")
        if m.metadata.src_node_id != sender:
            return (f"node {sender} pushed a reply to message {m.metadata.reply_to_message_id[:80]} claiming "
                    f"src_node_id {m.metadata.src_node_id}: a node answers only as itself")
    return ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.fleetgate", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT the centres connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink on loopback, e.g. https://127.0.0.1:9100")
    p.add_argument("--certfile", default=None, help="TLS certificate to serve (the SuperLink's)")
    p.add_argument("--keyfile", default=None)
    p.add_argument("--ca-file", default=None, help="CA that signed the SuperLink's certificate")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded SuperNode poll otherwise
    host, _, port = args.listen.rpartition(":")
    if bool(args.certfile) != bool(args.keyfile):
        raise SystemExit("--certfile and --keyfile go together")
    log.info("Fleet gate on %s -> %s (only %s...)", args.listen, args.upstream, FLEET_PREFIX)
    uvicorn.run(gate_app(args.upstream, args.ca_file), host=host.strip("[]"), port=int(port), log_level="info",
                ssl_certfile=args.certfile, ssl_keyfile=args.keyfile, access_log=False)


if __name__ == "__main__":
    main()
