"""Live terminal view of a run (rich), driven by RUN_DIR/run.json."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class LiveView:
    def __init__(self, console: Console, total_rounds: int, centres: list[str]):
        self.console, self.centres = console, centres
        self.progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                                 console=console)
        self.task = self.progress.add_task("rounds", total=total_rounds, status="waiting for centres")
        # On a terminal: a live panel. In a log or CI: one plain line per finished round.
        self.live = Live(self._render({}), console=console, refresh_per_second=4, transient=False) \
            if console.is_terminal else None
        self.t0, self.printed = time.monotonic(), 0

    def __enter__(self) -> LiveView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.__exit__(*exc)

    def update(self, run: dict[str, Any]) -> None:
        rounds = run.get("rounds", [])
        if self.live is None:
            for rec in rounds[self.printed:]:
                self.console.print(self._line(rec, run))
                self.console.file.flush()  # a pipe or log file is block-buffered
            self.printed = len(rounds)
            return
        status = "waiting for centres" if not rounds else f"eval loss {rounds[-1]['eval-loss-mean']:.3f}"
        self.progress.update(self.task, completed=len(rounds) and rounds[-1]["round"], status=status)
        self.live.update(self._render(run))

    def _line(self, rec: dict[str, Any], run: dict[str, Any]) -> str:
        per = ", ".join(f"{n} loss {m.get('train-loss', 0):.3f} {m.get('tokens-per-second', 0):,.0f} tok/s"
                        for n, m in rec["centres"].items())
        total = run.get("config", {}).get("rounds", "?")
        return (f"[{time.monotonic() - self.t0:6.1f}s] round {rec['round']}/{total}: held-out loss "
                f"{rec['eval-loss-mean']:.3f} (model before the round); {per}; round {rec['wall-seconds']:.1f}s")

    def _render(self, run: dict[str, Any]) -> Group:
        table = Table(title="centres (last round)", expand=False)
        for col in ("centre", "train loss", "held-out loss", "tokens/s", "compute s", "round s"):
            table.add_column(col, justify="right" if col != "centre" else "left")
        last = run.get("rounds", [])[-1] if run.get("rounds") else None
        for name in self.centres:
            m = last["centres"].get(name) if last else None
            if m is None:
                table.add_row(name, "-", "-", "-", "-", "-")
                continue
            table.add_row(name, f"{m.get('train-loss', float('nan')):.3f}",
                          f"{m.get('eval-loss', float('nan')):.3f}", f"{m.get('tokens-per-second', 0):,.0f}",
                          f"{m.get('compute-seconds', 0):.1f}", f"{last['wall-seconds']:.1f}")
        return Group(self.progress, table)


def summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("centre", "held-out loss start", "held-out loss final", "train loss last",
                "tokens", "mean tokens/s"):
        table.add_column(col, justify="right" if col != "centre" else "left")
    for r in rows:
        table.add_row(r["centre"], f"{r['eval-loss-first']:.3f}", f"{r['eval-loss-final']:.3f}",
                      f"{r['train-loss-last']:.3f}", f"{r['tokens']:,.0f}", f"{r['tokens-per-second']:,.0f}")
    return table
