"""A warm ClientApp runtime: one long-lived process per centre in place of a process per message.

Stock Flower 1.41 runs a centre's ClientApp like this: the SuperNode starts
`flower-superexec`, which polls the SuperNode's Runtime API for tasks and starts a
fresh `flwr-clientapp` process for every message (Python start, flwr import, app
bundle install, app import: ~1-1.5 s of a round on these machines). This process
does the same steps, with Flower's own functions for each (so the wire protocol
and the task life cycle are Flower's), but stays up between messages:

    acquire a task (token) -> pull message + context + run + bundle -> install
    the bundle (once per bundle hash) -> load its ClientApp -> run it -> push the
    reply -> push the task's final status and context

The SuperNode runs with `--isolation process`, i.e. it expects exactly such an
outside process; clients/supernode.py starts this one as its child.

    python -m clients.runtime --runtime-api-address 127.0.0.1:9094 --parent-pid PID
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    fab_from_proto,
    message_to_proto,
    recorddict_from_proto,
    run_from_proto,
)
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,  # pylint: disable=E0611
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry.http_retry import _RETRYABLE_STATUS_CODES, _RETRYABLE_TRANSPORT_ERRORS
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from clients import appnet, wire
from clients.egress import content_digest

# The task is handed out before the SuperNode has stored the message's objects, so the first
# object pull usually races it: the SuperNode's own short back-off (see fast_pull) applies here too.
from clients.supernode import PULL_BACKOFF_CAP_SECONDS, PULL_BACKOFF_SECONDS
from models.config import ConfigError

log = logging.getLogger("bridgepool.runtime")
POLL_SECONDS = 0.05  # one local HTTP request to the SuperNode per poll while idle
# Each poll costs the SuperNode a few ms of CPU that the centre's training needs (2 cores here).
# Fast polls matter right after a task ends: the next round's message follows within seconds.
# So the wait grows with the time since the last task ended (at most BACKOFF_FRACTION of it,
# i.e. <= 5 % added to an idle gap) up to SLOW_POLL_SECONDS; while a task runs, the next one
# can only be another run's, and BUSY_POLL_SECONDS is soon enough.
BACKOFF_FRACTION = 0.05
SLOW_POLL_SECONDS = 0.25
BUSY_POLL_SECONDS = 1.0


OPS = {"train": "train", "evaluate": "evaluate", "query": "prepare"}  # Flower's message types, the worker's ops
WORKER_ERROR = "<class 'clients.wire.WorkerError'>:<'{}'>"  # how Flower words an app's error (server unwraps it)


class AppHost:
    """One bundle's ClientApp in its own process (clients/apphost.py): tasks go in over a pipe,
    only each reply's content (or the exception raised) comes back."""

    def __init__(self, fab_id: str, fab_version: str, fab_hash: str, user: str | None = None,
                 network: Sequence[str] = ()):
        """`network`: the argv prefix that gives it its network (clients/appnet.py; () for this process's)."""
        self.fab_hash = fab_hash
        task_r, task_w = os.pipe()
        reply_r, reply_w = os.pipe()
        argv = [*network, sys.executable, "-m", "clients.apphost", "--fab-id", fab_id, "--fab-version", fab_version,
                "--fab-hash", fab_hash, "--in-fd", str(task_r), "--out-fd", str(reply_w)]
        if user is not None:  # the bundle's own user: its group is the worker socket's (--socket-group)
            argv += ["--user", user]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(task_r, reply_w), umask=0o077)
        finally:
            os.close(task_r)
            os.close(reply_w)
        self._tx, self._rx = Connection(task_w, readable=False), Connection(reply_r, writable=False)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, Future[tuple[dict[str, Any], wire.Arrays]]] = {}
        threading.Thread(target=self._read, daemon=True, name=f"apphost-{fab_hash[:8]}").start()
        # `unshare` execs the interpreter in place: the pid is the app host's.
        log.info("app host pid %d for bundle %s (%s %s)%s%s", self.proc.pid, fab_hash[:12], fab_id, fab_version,
                 f" as user {user}" if user else "", ", no network" if network else "")

    def run(self, message: Message, context: Context) -> tuple[dict[str, Any], wire.Arrays]:
        """The bundle's answer to one task: ({"status": "ok"}, {"content": proto bytes}) or
        ({"status": "raised", "type", "text", "load"}, {})."""
        task, done = next(self._ids), Future()
        raw = {"message": np.frombuffer(message_to_proto(message).SerializeToString(), np.uint8),
               "context": np.frombuffer(context_to_proto(context).SerializeToString(), np.uint8)}
        with self._lock:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app host of bundle {self.fab_hash[:12]} exited ({self.proc.returncode})")
            self._pending[task] = done
            wire.send(self._tx, {"id": task}, raw)
        return done.result()

    def _read(self) -> None:
        try:
            while True:
                head, arrays = wire.recv(self._rx)
                with self._lock:
                    waiting = self._pending.pop(int(head.get("id", -1)), None)
                if waiting is not None:
                    waiting.set_result((head, arrays))
        except (EOFError, OSError, ValueError, wire.WireError):  # it exited (or sent garbage): its tasks fail
            self.proc.wait()
            with self._lock:
                pending, self._pending = self._pending, {}
            for waiting in pending.values():
                waiting.set_exception(RuntimeError(f"the app host of bundle {self.fab_hash[:12]} exited "
                                                   f"({self.proc.returncode}) during the task"))

    def close(self) -> None:
        self._tx.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # threads of a stuck task: the process goes with them
            self.proc.kill()
            self.proc.wait()


def reply_records(content: RecordDict) -> dict[str, tuple[str, dict[str, Any]]]:
    """A Flower reply's records in the form the worker's digest is taken over (clients/egress.py)."""
    return {name: (type(record).__name__,
                   {k: a.numpy() for k, a in record.items()} if isinstance(record, ArrayRecord) else dict(record))
            for name, record in content.items()}


class WarmRuntime:
    """Runs the tasks a SuperNode hands out, each in a thread of this process."""

    def __init__(self, runtime_api_address: str, root_certificates: bytes | None = None,
                 app_user: str | None = None, app_network: Sequence[str] = ()):
        self.address, self.certificates = runtime_api_address, root_certificates
        self.app_user = app_user  # the user the bundle's code runs as (None: this process's)
        self.app_network = list(app_network)  # argv prefix of each app host (clients/appnet.py)
        self._control = self._client("SuperExec")
        self._host: AppHost | None = None
        self._loading = threading.Lock()  # tasks run in threads; a bundle is installed and started once
        self._tasks_lock = threading.Lock()
        self._running = 0  # tasks in flight
        self._last_ended = time.monotonic()  # when the last task ended (start-up counts as one)
        self._task_ended = threading.Event()

    def _client(self, component: str, token: str | None = None) -> RuntimeHttpClient:
        interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.certificates is None,
            root_certificates=self.certificates, interceptors=interceptors,
            retry_invoker=_retry_invoker())

    def serve_forever(self, poll: float = POLL_SECONDS) -> None:
        log.info("warm ClientApp runtime polling %s every %.2fs or more", self.address, poll)
        while True:
            try:
                ran = self.run_one()
            except (httpx.HTTPError, RunNotRunningException) as err:  # the SuperNode restarting, a stopped run
                log.warning("task poll failed (%s); retrying", err)
                ran = False
            if not ran:
                self._task_ended.wait(self.poll_wait(poll))  # a task ending cuts the wait short
                self._task_ended.clear()

    def poll_wait(self, poll: float = POLL_SECONDS) -> float:
        """Seconds until the next task poll (see BACKOFF_FRACTION)."""
        with self._tasks_lock:
            if self._running:
                return max(poll, BUSY_POLL_SECONDS)
            idle = time.monotonic() - self._last_ended
        return min(max(poll, SLOW_POLL_SECONDS), max(poll, BACKOFF_FRACTION * idle))

    def run_one(self) -> bool:
        """Start the next pending ClientApp task, if any; True if there was one.

        Each task runs in a thread of its own, as SuperExec gives each its own process: a
        task stuck on a message that will never arrive (its SuperLink died mid-transfer, and
        Flower retries a missing object for minutes) must not hold up the next run's tasks.
        """
        res = self._control.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (res.HasField("task") and res.token):
            return False
        threading.Thread(target=self._run_task_logged, args=(res.token,), daemon=True,
                         name=f"task-{res.task.task_id}").start()
        return True

    def _run_task_logged(self, token: str) -> None:
        with self._tasks_lock:
            self._running += 1
        try:
            self._run_task(token)
        except Exception as err:  # e.g. the reply could not be pushed: the SuperNode is gone or restarting
            log.error("task ended without delivering its reply: %s", err)
        finally:
            with self._tasks_lock:
                self._running -= 1
                self._last_ended = time.monotonic()
            self._task_ended.set()  # the next round's message follows soon: poll fast from now

    def _run_task(self, token: str) -> None:
        # What flwr-clientapp does for one task (flwr/supernode/runtime/run_clientapp.py),
        # minus the process start and the exit at the end.
        client = self._client("flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        t0 = time.perf_counter()
        t_pulled = t_ran = t0
        ticket = ""
        try:
            message, context, run, fab = pull_task_input(client)
            t_pulled = time.perf_counter()
            ticket, refused = admit(message, context)
            if refused is not None:  # not this run's state: the app never sees the task
                reply, details = refused
            else:
                host = self._app(run.fab_id, run.fab_version, fab.hash_str, fab.content)
                reply, details = checked_reply(message, context, *host.run(message, context))
            t_ran = time.perf_counter()
            status = SubStatus.FAILED if reply.has_error() else SubStatus.COMPLETED
        except Exception as ex:  # the runtime's own failure (its words only), the runtime stays up
            details = f"the centre's runtime could not run the task: {type(ex).__name__}"
            log.error("task failed in the runtime", exc_info=ex)
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            finally:
                if ticket and context is not None:
                    release(context, ticket)
                push_task_output(client=client, context=context, sub_status=status, details=details)
                heartbeat.stop()
                client.close()
                t1 = time.perf_counter()
                log.info("task %s: pull %.2fs, ClientApp %.2fs, push %.2fs", status, t_pulled - t0,
                         t_ran - t_pulled, t1 - max(t_ran, t_pulled))

    def _app(self, fab_id: str, fab_version: str, fab_hash: str, fab_content: bytes) -> AppHost:
        """The run's app host: the bundle installed (by this process) and started in a process of its
        own once per bundle hash; another bundle's host is stopped first (threat 7: nothing of one
        run's code lives on into the next's)."""
        with self._loading:
            if self._host is not None and self._host.fab_hash == fab_hash and self._host.proc.poll() is None:
                return self._host
            if self._host is not None:
                self._host.close()
            install_from_fab(fab_content, skip_prompt=True)
            self._host = AppHost(fab_id, fab_version, fab_hash, self.app_user, self.app_network)
            return self._host

    def close(self) -> None:
        if self._host is not None:
            self._host.close()


def _retry_invoker() -> RetryInvoker:
    """Flower's HTTP retry policy for its runtime clients, minus what only suits a one-task process.

    flwr-clientapp's invoker answers HTTP 401 (e.g. the task's token revoked when its run
    stopped, or a coordinator restart) by sending SIGINT to its own process: right for a
    process per task, fatal for this one, which must outlive any single task. Here a 401
    or 403 ends only the task (the exception reaches _run_task's handler); transport errors
    and 502/503/504 are retried with back-off as Flower does, for at most a minute.
    """

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in _RETRYABLE_STATUS_CODES
        return any(term in str(exc).lower() for term in ("certificate", "ssl", "tls"))

    return RetryInvoker(wait_gen_factory=lambda: exponential(base_delay=0.1, max_delay=5),
                        recoverable_exceptions=(*_RETRYABLE_TRANSPORT_ERRORS, httpx.HTTPStatusError),
                        max_tries=None, max_time=60.0, should_giveup=give_up)


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """flwr-clientapp's pull_task_input (flwr/supernode/runtime/run_clientapp.py), with a short back-off."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF_SECONDS, backoff_cap=PULL_BACKOFF_CAP_SECONDS)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: the deflated message lacks it
    return message, context, run, fab


def admit(message: Message, context: Context) -> tuple[str, tuple[Message, str] | None]:
    """Before the app runs: the worker admits the task for the SuperLink's run id (clients/runs.py), which
    this runtime read from the SuperNode with the task and the app cannot change. Returns the task's ticket
    (also put in the node config the app gets, for its requests) and None, or "" and the error reply in
    the worker's words when it refuses (a run-name whose state is another run's)."""
    socket = context.node_config.get("worker-socket")
    if socket is None:
        return "", None
    config = message.content["config"] if message.has_content() and "config" in message.content else {}
    ask = {"op": "admit", "run-id": int(context.run_id), "run-config": dict(context.run_config),
           "round": int(config.get("server-round", 0)), "reply-to": OPS.get(message.metadata.message_type, "unknown")}
    try:
        head, _ = wire.call(str(socket), ask, timeout=60)
    except wire.WorkerError as err:
        return "", _error(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err))
    ticket = str(head.get("ticket", ""))
    if ticket:
        context.node_config["worker-ticket"] = ticket
    return ticket, None


def release(context: Context, ticket: str) -> None:
    """The task ended: its ticket opens nothing more (a thread the app left behind included)."""
    try:
        wire.call(str(context.node_config["worker-socket"]), {"op": "release", "ticket": ticket}, timeout=60)
    except (wire.WorkerError, OSError) as err:  # the worker restarted: its tickets went with it
        log.warning("could not release the task's ticket: %s", err)


def checked_reply(message: Message, context: Context, head: dict[str, Any],
                  arrays: wire.Arrays) -> tuple[Message, str]:
    """The Flower reply this centre may send for `message`, and its task details (threat 3).

    The bundle's reply goes out only if the centre's worker produced exactly that content: the
    worker vouches for the digest of each reply it made (clients/worker.py). Anything else (a
    bundle that skipped the egress guard, added a record, changed a metric, or forged an error
    text) is replaced by an error reply in the runtime's and the worker's words, never the
    bundle's; the worker records it in its egress ledger (stage `runtime`).
    """
    socket = context.node_config.get("worker-socket")
    config = message.content["config"] if message.has_content() and "config" in message.content else {}
    ask = {"op": "vouch", "round": int(config.get("server-round", 0)),
           "reply-to": OPS.get(message.metadata.message_type, "unknown"),
           "run-name": str(context.run_config.get("run-name", ""))}
    if head.get("status") == "ok":
        content = recorddict_from_proto(ProtoRecordDict.FromString(arrays["content"].tobytes()))
        if socket is None:  # the operator's node config trains in the app process: nothing to vouch
            log.warning("no worker-socket in the node config: the reply is sent unchecked")
            return Message(content=content, reply_to=message), ""
        try:
            wire.call(str(socket), {**ask, "digest": content_digest(reply_records(content))}, timeout=60)
        except wire.WorkerError as err:
            return _error(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err))
        return Message(content=content, reply_to=message), ""
    code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if head.get("load") else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    text = str(head.get("text", ""))
    if socket is None:
        return _error(message, code, text)
    try:  # the worker's own error words may leave; anything else is withheld
        wire.call(str(socket), {**ask, "error": text}, timeout=60)
    except wire.WorkerError as err:
        return _error(message, code, str(err))
    return _error(message, code, text)


def _error(message: Message, code: int, text: str) -> tuple[Message, str]:
    reason = WORKER_ERROR.format(text)
    return Message(Error(code=code, reason=reason), reply_to=message), reason


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.runtime", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--root-certificates", default=None,
                        help="CA certificate of the Runtime API's TLS certificate (omit for plain HTTP on loopback)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--poll", type=float, default=POLL_SECONDS, help="seconds between task polls while idle")
    parser.add_argument("--app-user", default=None,
                        help="run submitted bundles as this user (needs root): no access to the centre's "
                             "data, state, ledger or keys")
    parser.add_argument("--app-network", default=appnet.DEFAULT, choices=appnet.CHOICES, help=appnet.HELP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise
    if args.parent_pid is not None:
        # The monitor sends SIGINT here when the SuperNode is gone. A process started from a background
        # job inherits SIGINT ignored, and Python then installs no handler: install it, or it lives on.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        start_parent_process_monitor(args.parent_pid)
    certificates = Path(args.root_certificates).read_bytes() if args.root_certificates else None
    if args.app_user is not None:
        try:
            pwd.getpwnam(args.app_user)
        except KeyError:
            raise SystemExit(f"--app-user {args.app_user}: no such user on this machine") from None
        if os.geteuid() != 0:
            raise SystemExit("--app-user needs the runtime to start as root (it drops to that user per bundle)")
    try:
        network, why = appnet.resolve(args.app_network, args.app_user)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    log.info("%s", why)
    runtime = WarmRuntime(args.runtime_api_address, certificates, args.app_user, network)
    try:
        runtime.serve_forever(args.poll)
    except KeyboardInterrupt:
        log.info("warm ClientApp runtime stopping")
        runtime.close()


if __name__ == "__main__":
    main()
