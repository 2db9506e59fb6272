"""Egress ledger and guard: everything a centre sends is checked and recorded before it leaves.

A reply may hold only three records: `arrays` (tensors whose names, shapes and dtypes
are the global model's parameters), `metrics` (scalar numbers under allow-listed
names) and `centre` (this centre's own name). Anything else (an unknown key, a
non-parameter shape, a string, bytes, a list, a config echoed back) blocks the whole
reply: nothing is sent, the reason goes to the centre's log and the blocked count.

Every reply, sent or blocked, is appended to a JSONL ledger on the centre's own disk:
time, run, round, record names, per array name/dtype/shape/bytes/SHA-256 and every
metric name. Values never enter the ledger, only their fingerprints.

The guard runs twice, both times inside the centre worker (the operator's installed
code, which a submitted app cannot change): on the worker's reply to the ClientApp
(stage `worker-reply`), and on the final Flower reply the ClientApp shell describes
back to the worker before returning it (stage `flower-reply`). Pure Python + numpy;
no flwr import, so the check does not depend on the Flower version a bundle brings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bridgepool.centre")

# What a centre may report, by name (CentreTrainer.evaluate and .train_round). A new
# metric must be added here on purpose: tests/test_egress.py checks the trainer's names.
ALLOWED_METRICS: frozenset[str] = frozenset({
    "eval-loss", "eval-tokens", "eval-seconds",
    "train-loss", "tokens", "num-examples", "compute-seconds", "tokens-per-second",
    "step-seconds-max", "step-seconds-mean", "flops-per-token", "peak-memory-bytes",
    "inner-steps",  # inner steps this round took (a time budget decides it per centre: round-seconds)
    "steps-ahead",  # inner steps of the round trained before its global model arrived (overlap-steps)
    "stale-base",  # 1: this centre cannot rebuild the broadcast model, send the full one (clients/broadcast.py)
})
# record name -> the only record type it may have
ALLOWED_RECORDS: dict[str, str] = {"arrays": "ArrayRecord", "metrics": "MetricRecord", "centre": "ConfigRecord",
                                   # data plane: the manifest (names, forms, SHA-256) of the update the worker
                                   # itself sent; the Flower reply may only repeat it (EgressGuard.check `upload`)
                                   "upload": "ConfigRecord"}
WORKER_REPLY_KEYS = frozenset({"status", "centre", "metrics", "upload"})
LEDGER_NAME = "egress-ledger.jsonl"
LEDGERED = ("dtype", "shape", "bytes", "sha256", "blake3")  # what the ledger keeps of an array: form and digest

Manifest = Mapping[str, tuple[tuple[int, ...], str]]  # models.gpt.parameter_manifest
Described = dict[str, dict[str, Any]]  # record name -> {"type": ..., "items": {key: entry}}


class EgressBlocked(RuntimeError):
    """A reply broke the egress rules. The message names no value and no unlisted key
    verbatim (it may travel to the server as Flower's error reason)."""


def packed_manifest(manifest: Manifest, key: str) -> Manifest:
    """The one array a model message carries when weights travel packed (models/packing.py):
    every parameter of `manifest`, flattened in order into a float32 vector named `key`."""
    return {key: ((sum(math.prod(shape) for shape, _ in manifest.values()),), "float32")}


# ------------------------------------------------------------------ describing
def describe_value(value: Any) -> dict[str, Any]:
    """A value's form and fingerprint, never its content."""
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return {"kind": "array", "dtype": str(data.dtype), "shape": list(data.shape),  # hashed in place, no copy
                "bytes": int(data.nbytes), "sha256": hashlib.sha256(memoryview(data).cast("B")).hexdigest()}
    if isinstance(value, bool):
        return {"kind": "bool"}
    if isinstance(value, int | float | np.integer | np.floating):
        return {"kind": "scalar"}
    if isinstance(value, str | bytes):
        raw = value.encode() if isinstance(value, str) else value
        return {"kind": type(value).__name__, "len": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    if isinstance(value, list | tuple):
        return {"kind": "list", "len": len(value)}
    return {"kind": type(value).__name__}


def describe(records: Mapping[str, tuple[str, Mapping[str, Any]]]) -> Described:
    """`{record name: (record type, {key: value})}` -> the JSON-safe form the guard checks."""
    return {name: {"type": rtype, "items": {str(k): describe_value(v) for k, v in items.items()}}
            for name, (rtype, items) in records.items()}


Records = dict[str, tuple[str, Mapping[str, Any]]]  # record name -> (record type, {key: value})


def reply_records(reply: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Records:
    """The Flower reply's records, as the ClientApp shell builds them from the worker's reply (one
    mapping for both: the runtime's check compares the two, so they must not drift apart)."""
    records: Records = {
        "metrics": ("MetricRecord", {k: float(v) for k, v in reply.get("metrics", {}).items()}),
        "centre": ("ConfigRecord", {"name": reply.get("centre")}),
    }
    if arrays:
        records["arrays"] = ("ArrayRecord", dict(arrays))
    if "upload" in reply:
        records["upload"] = ("ConfigRecord", {"manifest": reply["upload"]})
    return records


def describe_worker_reply(reply: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Described:
    """The worker's reply in the shape of the Flower reply the ClientApp builds from it."""
    records = reply_records(reply, arrays)
    extra = {k: reply[k] for k in reply if k not in WORKER_REPLY_KEYS}
    if extra:  # header keys the ClientApp could forward: checked like a record of their own
        records["worker-header"] = ("header", extra)
    return describe(records)


def content_digest(records: Mapping[str, tuple[str, Mapping[str, Any]]]) -> str:
    """One SHA-256 over a reply's whole content, values included (where `describe` keeps only
    forms): the worker vouches for the digest of each reply it produced, and the centre's
    runtime sends a Flower reply only if its digest is one the worker vouched for."""
    canon = {name: [rtype, {str(k): _canonical(v) for k, v in items.items()}]
             for name, (rtype, items) in records.items()}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """A JSON-safe form that tells apart every value Flower's records can hold (floats by their
    exact hex form: two floats that print alike but differ in a low bit are different content)."""
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return ["array", str(data.dtype), list(data.shape), hashlib.sha256(memoryview(data).cast("B")).hexdigest()]
    if isinstance(value, bool | np.bool_):
        return ["bool", bool(value)]
    if isinstance(value, int | np.integer):
        return ["int", int(value)]
    if isinstance(value, float | np.floating):
        return ["float", float(value).hex()]
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, list | tuple):
        return ["list", [_canonical(v) for v in value]]
    raise TypeError(f"a reply value of type {type(value).__name__} has no canonical form")


# -------------------------------------------------------------------- checking
def describe_blob(entries: Iterable[Any]) -> dict[str, Any]:
    """An `arrays` record described from a data-plane manifest (models/blob.py Entry: already hashed,
    with the manifest's hash, BLAKE3 by default: the ledger names it)."""
    return {"type": "ArrayRecord", "items": {e.name: {"kind": "array", "dtype": e.dtype, "shape": list(e.shape),
                                                      "bytes": e.nbytes, e.hash: e.digest} for e in entries}}


def violations(message: Described, manifest: Manifest, centre: str,
               allowed_metrics: Iterable[str] = ALLOWED_METRICS, upload: str | None = None) -> list[str]:
    """Every rule `message` breaks, as messages that quote only manifest/allow-listed names.
    `upload`: the SHA-256 of the manifest text of the update this centre's worker sent on the data
    plane for this message (None: it sent none, so no `upload` record may leave)."""
    allowed_metrics = frozenset(allowed_metrics)
    out: list[str] = []
    for rname, record in message.items():
        rtype, items = record.get("type"), record.get("items", {})
        if ALLOWED_RECORDS.get(rname) != rtype:
            out.append(f"record {_name(rname, ALLOWED_RECORDS)} of type {_name(str(rtype), ALLOWED_RECORDS.values())} "
                       f"is not one a centre may send (allowed: arrays, metrics, centre)")
            continue
        for key, entry in items.items():
            if rname == "arrays":
                out += _array_violations(key, entry, manifest)
            elif rname == "metrics":
                if key not in allowed_metrics:
                    out.append(f"metric {_name(key, allowed_metrics)} is not on the metric allow-list")
                elif entry.get("kind") != "scalar":
                    out.append(f"metric {key} is a {entry.get('kind')}, only scalar numbers may be sent")
            elif rname == "upload":
                if key != "manifest" or entry.get("kind") != "str" or upload is None or entry.get("sha256") != upload:
                    out.append("record upload must hold only the manifest of the update this centre's worker "
                               "sent on the data plane")
            elif key != "name":
                out.append(f"record centre holds key {_name(key, ('name',))}; only 'name' is allowed")
            elif entry.get("kind") != "str" or entry.get("sha256") != _sha(centre.encode()):
                out.append("record centre must hold exactly this centre's own name")
    return out


def _array_violations(key: str, entry: Mapping[str, Any], manifest: Manifest) -> list[str]:
    if entry.get("kind") != "array":
        return [f"array record entry {_name(key, manifest)} is a {entry.get('kind')}, not an array"]
    got = (tuple(entry["shape"]), entry["dtype"])
    if key not in manifest:
        return [f"array {_name(key, manifest)} ({got[1]}, shape {got[0]}) is not a parameter of the model"]
    want = (tuple(manifest[key][0]), manifest[key][1])
    if got != want:
        return [f"array {key} is {got[1]} {got[0]}, the model declares {want[1]} {want[0]}"]
    return []


def _name(name: str, known: Iterable[str]) -> str:
    """A listed name quoted; any other (it could itself carry data) only as length and hash."""
    return repr(name) if name in set(known) else _safe(name, ())


def _safe(name: str, known: Iterable[str]) -> str:
    if name in set(known):
        return name
    return f"<unlisted name: {len(name)} chars, sha256 {_sha(name.encode())[:12]}>"


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------- ledger
class EgressGuard:
    """One per centre worker: checks replies, appends to the ledger, counts blocks."""

    def __init__(self, centre: str, ledger: Path, on_blocked: Callable[[str], None] | None = None):
        self.centre, self.ledger = centre, Path(ledger)
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        entries = read_ledger(self.ledger)
        self.blocked_total = sum(1 for e in entries if e.get("verdict") == "blocked")
        self.refused_total = sum(1 for e in entries if e.get("verdict") == "refused")
        self._on_blocked = on_blocked  # called with the run name, e.g. to count it in Prometheus

    def check(self, message: Described, manifest: Manifest, *, run: str, round: int, op: str,
              stage: str, upload: str | None = None, **extra: Any) -> list[str]:
        """Record `message` in the ledger; raise EgressBlocked if it breaks a rule. `upload`: see
        `violations`; `extra`: more fields for the ledger entry (the data plane's destination)."""
        problems = violations(message, manifest, self.centre, upload=upload)
        if problems:
            self.blocked_total += 1
            if self._on_blocked is not None:
                self._on_blocked(run)
        self._append(_entry(message, problems, manifest, centre=self.centre, run=run, round=round, op=op,
                            stage=stage, blocked_total=self.blocked_total, **extra))
        if problems:
            log.error("[%s] EGRESS BLOCKED (%s of %s, run %s round %s): %s. Nothing was sent; "
                      "recorded in %s (blocked so far: %d)", self.centre, stage, op, run, round,
                      "; ".join(problems), self.ledger, self.blocked_total)
            raise EgressBlocked(f"egress guard blocked the {op} reply of round {round}: "
                                + "; ".join(problems))
        return problems

    def refused(self, *, run: str, round: int, op: str, reasons: list[str], stage: str = "policy") -> None:
        """A request the centre's policy refused (clients/policy.py), or (stage `run-id`) a task or request
        for a run the state does not belong to (clients/runs.py): recorded before the error reply leaves,
        so the ledger names every refusal as well as every reply."""
        self.refused_total += 1
        self._append({"time": time.time(), "centre": self.centre, "run": run, "round": round, "op": op,
                      "stage": stage, "verdict": "refused", "violations": list(reasons),
                      "refused-total": self.refused_total, "records": [], "arrays": [], "metrics": [], "bytes": 0})
        log.error("[%s] REQUEST REFUSED (%s; %s, run %s round %s): %s; recorded in %s", self.centre, stage, op, run,
                  round, "; ".join(reasons), self.ledger)

    def runtime(self, *, run: str, round: int, op: str, problem: str | None = None) -> None:
        """The runtime's check of a final Flower reply against what the worker produced: `problem` None
        when the reply is the worker's (sent), else why it was withheld (a bundle that skipped or fooled
        the guard: blocked; the runtime sends an error of its own in its place)."""
        if problem is not None:
            self.blocked_total += 1
            if self._on_blocked is not None:
                self._on_blocked(run)
        self._append({"time": time.time(), "centre": self.centre, "run": run, "round": round, "op": op,
                      "stage": "runtime", "verdict": "sent" if problem is None else "blocked",
                      "violations": [] if problem is None else [problem], "blocked-total": self.blocked_total,
                      "records": [], "arrays": [], "metrics": [], "bytes": 0})
        if problem is not None:
            log.error("[%s] EGRESS BLOCKED at the runtime (%s, run %s round %s): %s; recorded in %s",
                      self.centre, op, run, round, problem, self.ledger)

    def _append(self, entry: dict[str, Any]) -> None:
        # Append-only, one line per reply, on disk before the reply can leave.
        with self.ledger.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _entry(message: Described, problems: list[str], manifest: Manifest, **fields: Any) -> dict[str, Any]:
    arrays = message.get("arrays", {}).get("items", {})
    return {
        "time": time.time(), **{k.replace("_", "-"): v for k, v in fields.items()},
        "verdict": "blocked" if problems else "sent",
        # A blocked message may carry data in its key names: unlisted ones only as hashes.
        "records": sorted(_safe(r, ALLOWED_RECORDS) for r in message),
        "arrays": [{"name": _safe(k, manifest), **{f: e[f] for f in LEDGERED if f in e}} for k, e in arrays.items()],
        "metrics": sorted(_safe(k, ALLOWED_METRICS) for k in message.get("metrics", {}).get("items", {})),
        "bytes": sum(int(e.get("bytes", 0)) for e in arrays.values()),
        "violations": problems,
    }


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """All entries of a ledger (a missing file is an empty ledger; a torn last line is skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only a crash mid-write can leave one, and only as the last line
    return out
