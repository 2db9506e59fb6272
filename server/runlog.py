"""run.json: every round's figures, rewritten atomically after each round.

The launcher's live view, `bridgepool report` and the benchmarks all read this
one file, so its layout is the contract:
{"status", "config", "started", "finished", "rounds": [{"round", "wall-seconds",
  "aggregation-seconds", "replied", "failed", "bytes-sent", "bytes-received",
  "eval-loss-mean", "centres": {NAME: {metric: value}}}], "final": {...}}
`eval-loss` in round k's centres is the held-out loss of the global model that
round k started from (evaluated before training); `final` holds the last model's.
With `dp-clip` > 0 each round also has "dp": {"clip", "noise-multiplier", "delta",
"rounds", "noise-std", "epsilon"} (server/privacy.py; epsilon null = unbounded).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, run_dir: Path, config: dict[str, Any], resume: bool = False):
        self.path = Path(run_dir) / "run.json"
        previous = self._read() if resume else None
        self.data: dict[str, Any] = previous or {"rounds": [], "started": time.time()}
        self.data.update({"status": "running", "config": config})
        self.data.setdefault("events", []).append({"time": time.time(), "event": "resumed" if previous else "started"})
        self.write()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def add_round(self, record: dict[str, Any]) -> None:
        # A resumed run replaces any rounds after its checkpoint.
        self.data["rounds"] = [r for r in self.data["rounds"] if r["round"] < record["round"]]
        self.data["rounds"].append(record)
        self.write()

    def event(self, name: str, **fields: Any) -> None:
        self.data["events"].append({"time": time.time(), "event": name, **fields})
        self.write()

    def finish(self, status: str, final: dict[str, Any] | None = None, message: str = "") -> None:
        self.data.update({"status": status, "finished": time.time(), "message": message})
        if final is not None:
            self.data["final"] = final
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
