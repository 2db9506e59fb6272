"""Which run a centre's state belongs to: the SuperLink's run id, not only the run-name (issue 19, threat 4).

A run's state at a centre (inner AdamW moments, position.json, the steps record) lives under
STATE/RUN-NAME, and the run-name is whatever the submitter wrote in the run config. So a second run
naming a first run's run-name would load, overwrite and delete the first run's state. The run id is
the SuperLink's own number for a run; the centre's runtime (clients/runtime.py, the operator's code)
reads it from the SuperNode with the task and tells the worker, over its own connection, before the
submitted app runs (op `admit`). The worker binds a run-name to the first run id it admits and keeps
that binding on disk (STATE/run-ids.json). Another run id is admitted for a bound run-name only as
a resume (the run config says `resume = true`: a resumed run is a new run id that must find the same
state); otherwise the task is refused, named in the reply and the egress ledger, and the app never
runs. An admitted task gets a ticket, which the app's requests to the worker must carry and whose
run-name they must name: a bundle cannot name another run's state, and a ticket ends with its task.

What this does not tell apart: a run that declares `resume` from the run it resumes. Only the
coordinator's operator submits runs (the Control API is on its loopback, threat 1).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

BOOK_NAME = "run-ids.json"
MAX_TICKETS = 64  # tasks in flight at once are a handful; older tickets are dropped first


class RunRefused(RuntimeError):
    """A task or request for a run this centre's state does not belong to; the text says why and what to do."""


class RunBook:
    """run-name -> run id, kept in `path` (0600), and the tickets of the tasks now admitted."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.bound: dict[str, int] = {}
        if self.path.exists():
            self.bound = {str(k): int(v) for k, v in json.loads(self.path.read_text()).items()}
        self.tickets: dict[str, tuple[str, int]] = {}  # ticket -> (run-name, run id)

    def admit(self, run_name: str, run_id: int, resume: bool) -> str:
        """A ticket for a task of run `run_id` naming `run_name`, or RunRefused."""
        owner = self.bound.get(run_name)
        if owner is not None and owner != run_id and not resume:
            raise RunRefused(f"run-name {run_name!r} holds the state of run {owner} at this centre; run {run_id} "
                             "may use it only to resume that run (run config resume = true): choose another "
                             "run-name for a new run")
        if owner != run_id:
            self.bound[run_name] = run_id
            self._save()
        ticket = secrets.token_hex(16)
        self.tickets[ticket] = (run_name, run_id)
        while len(self.tickets) > MAX_TICKETS:
            del self.tickets[next(iter(self.tickets))]
        return ticket

    def check(self, ticket: object, run_name: str) -> int:
        """The run id of a request carrying `ticket` and naming `run_name`, or RunRefused."""
        held = self.tickets.get(str(ticket)) if ticket else None
        if held is None:
            raise RunRefused("the request carries no ticket of a task the centre's runtime admitted (a request "
                             "from outside a task, or after it ended): only the run's own tasks reach its state")
        if held[0] != run_name:
            raise RunRefused(f"the request names run-name {run_name!r}, but its task is run {held[1]}'s "
                             f"({held[0]!r}): a task reaches only its own run's state")
        if self.bound.get(run_name) != held[1]:
            raise RunRefused(f"run-name {run_name!r} now holds the state of run {self.bound.get(run_name)}, "
                             f"which resumed run {held[1]}")
        return held[1]

    def release(self, ticket: object) -> None:
        self.tickets.pop(str(ticket), None)

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.bound, f)
        os.replace(tmp, self.path)
