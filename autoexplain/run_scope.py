"""Where a thread reads the LLM settings of its run: the process's environment, or the run's own.

A run keeps its LLM settings (`llm.set_limits`, `llm_cache.set_cache`) in its process's environment.
A dask worker process serves whichever runs send it tasks, and two runs on one cluster at once may
differ (one with `--no-cache`, one with `--rpm 60`), so a worker keeps each run's settings apart,
by the run's name (`run_settings.WorkerSettings` adds and removes them), and a task reads its own
run's (`scope`, entered by the task wrapper). Anything outside such a scope reads the environment.

This module imports nothing of the library: the LLM modules read through it.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar

_RUNS: dict[str, dict[str, str | None]] = {}
_LOCK = threading.Lock()
_CURRENT: ContextVar[str | None] = ContextVar("autoexplain_run", default=None)


def add(run: str, settings) -> None:
    """Keep `settings` ((variable, value or None) pairs) as run `run`'s in this process."""
    with _LOCK:
        _RUNS[run] = dict(settings)


def remove(run: str) -> None:
    with _LOCK:
        _RUNS.pop(run, None)


def runs() -> list[str]:
    """The runs whose settings this process keeps."""
    with _LOCK:
        return list(_RUNS)


@contextmanager
def scope(run: str | None):
    """Read run `run`'s settings in this thread (where this process keeps them; else the environment)."""
    token = _CURRENT.set(run)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> str | None:
    """The run whose settings this thread reads, or None for the environment."""
    run = _CURRENT.get()
    with _LOCK:
        return run if run in _RUNS else None


def setting(name: str) -> str | None:
    """The value of the setting `name` (an environment variable's name) for this thread."""
    with _LOCK:
        own = _RUNS.get(_CURRENT.get())
    return own.get(name) if own is not None else os.environ.get(name)
