"""Python's cycle collector paused over a stage's bulk work.

A stage makes hundreds of thousands of small containers (rows, lists of floats), each of which
counts toward the collector's next pass, while the process already holds millions of long-lived
ones (the records, the word table): a full pass walks them all. On a simulate + score rerun of a
shard, the passes took about a quarter of the CPU. Those objects form no cycles; reference counting
frees them, so nothing is lost by waiting: the collector runs again when the last pause ends, and
then finds whatever cycles were made meanwhile.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_pauses = 0  # pauses under way (stages in several threads): the collector resumes after the last
_resume = False  # whether it was running when the first began


@contextmanager
def paused() -> Iterator[None]:
    global _pauses, _resume
    with _lock:
        if _pauses == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.enable()
