"""Progress of long stages, for whoever is listening in this process.

Stages call `report(stage, done, total, key)`, where `key` names the part of the work (a shard) so
that a listener can add up parts that run side by side. The CLI listens and draws progress bars; the Prefect
tasks listen through their loggers (`Throttle`), so a deployment's logs carry the same counts.
Nothing here knows about either.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

Listener = Callable[[str, str, int, int], None]  # (stage, key, done, total)
_listeners: list[Listener] = []
_lock = threading.Lock()


def listen(listener: Listener) -> Callable[[], None]:
    """Add a listener; returns the function that removes it."""
    with _lock:
        _listeners.append(listener)

    def remove() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return remove


def report(stage: str, done: int, total: int, key: str = "") -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(stage, key, done, total)


class Eta:
    """Time left, from the rate since the first report: the time before it was setup (loading a
    model, reading a shard, a first shard's warm-up), and counting it would put hours on the first
    lines of work that takes minutes."""

    def __init__(self):
        self.first: tuple[float, int] | None = None  # (time, done) at the first report

    def __call__(self, done: int, total: int) -> str:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, done)
        since, base = self.first
        if done >= total:
            return "ETA 0s"
        if done > base and now > since:
            return f"ETA {(now - since) / (done - base) * (total - done):.0f}s"
        return "ETA unknown"  # no rate yet


class Throttle:
    """Calls `emit(message)` at most every `step` of the way (and at the end), with an `Eta`: for
    log lines, where a line per unit would drown everything else."""

    def __init__(self, emit: Callable[[str], None], what: str, step: float = 0.1):
        self.emit, self.what, self.step = emit, what, step
        self.started, self.eta = time.perf_counter(), Eta()
        self.last = -1.0

    def __call__(self, done: int, total: int) -> None:
        eta = self.eta(done, total)  # every report counts towards the rate, shown or not
        frac = done / total if total else 1.0
        if frac - self.last < self.step and done != total:
            return
        self.last = frac
        elapsed = time.perf_counter() - self.started
        self.emit(f"{self.what}: {done:,}/{total:,} ({100 * frac:.0f}%), {elapsed:.0f}s elapsed, {eta}")
