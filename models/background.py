"""One file write at a time in a thread, waited for before anything it reads may change.

Both sides of a round write model-sized state every round: a centre its AdamW moments (2x the
model's bytes), the coordinator its checkpoint. Written in line, that time adds to every round;
written while the round's bytes travel, it is hidden. The writes are zero-copy (torch.save and
safetensors read the live tensors), so the owner must `wait` before those tensors change, and
before anything that must find the file on disk (a reply that vouches for the round).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("bridgepool")


class BackgroundWrite:
    def __init__(self, what: str):
        self.what = what  # named in the error: "the checkpoint of round 3"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, write: Callable[[], None], what: str | None = None) -> None:
        """Run `write` in a thread, after the previous one has finished (and raised, if it failed)."""
        self.wait()
        self.what = what or self.what

        def run() -> None:
            try:
                write()
            except BaseException as err:  # noqa: BLE001 (re-raised by wait, in the owner's thread)
                self._error = err

        self._thread = threading.Thread(target=run, name=f"write {self.what}", daemon=True)
        self._thread.start()

    def wait(self, quiet: bool = False) -> float:
        """Block until the write is done; the seconds this waited. Its error, if it failed (logged
        instead with `quiet`, when another error is already on its way)."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None:
            if quiet:
                log.error("writing %s failed: %s", self.what, err)
            else:
                raise RuntimeError(f"writing {self.what} failed: {err}") from err
        return time.perf_counter() - t0
