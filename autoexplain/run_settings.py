"""The LLM settings a run keeps in its process's environment, and handing them to dask workers.

`llm.set_limits` (concurrency, rates, retries, timeout) and `llm_cache.set_cache` set environment
variables: the server LLMs made from then on read them, and so do the processes the run starts. A
dask worker process was started before the run, by someone else: it never sees them. `WorkerSettings`
is a dask worker plugin that a run on dask registers (`flows.steps.scale_out`): every worker process,
present or joining later, keeps the run's settings under the run's name while the run lasts
(`run_scope`), its tasks read them (the task wrapper enters the run's scope), and it counts what its
LLMs were asked, so that the run's `LLM:` line includes the workers' requests (`collect`).

Two runs on one cluster at once each have their own settings (and their own LLM objects, so their
own concurrency and rate limits) and neither's end takes the other's away. Their counts are per
worker process: each run's `LLM:` line includes what the other's tasks asked on the same workers
while both ran.
"""

from __future__ import annotations

import os
from contextlib import suppress

from distributed.diagnostics.plugin import WorkerPlugin

from autoexplain import run_scope
from autoexplain.budget import ledger
from autoexplain.counters import COUNTS
from autoexplain.llm import LIMIT_ENVS
from autoexplain.llm_cache import CACHE_ENV, CACHE_MB_ENV

NAMES = (*LIMIT_ENVS, CACHE_ENV, CACHE_MB_ENV)
LLM_COUNTS = ("llm_sent", "llm_requests", "llm_cache_hits", "llm_429", "llm_5xx", "llm_timeouts", "llm_faults",
              "llm_retries")


def current() -> tuple[tuple[str, str | None], ...]:
    """This process's LLM settings, as (variable, value or None) pairs."""
    return tuple((name, os.environ.get(name)) for name in NAMES)


def _spent() -> dict:
    books = ledger()
    return {**{k: COUNTS[k] for k in LLM_COUNTS}, "tokens": books.tokens, "dollars": books.dollars,
            "unpriced": books.unpriced}


PREFIX = "autoexplain-run-settings-"


class WorkerSettings(WorkerPlugin):
    """Run `run`'s LLM settings in every worker process while it lasts (see the module docstring)."""

    def __init__(self, run: str, settings):
        self.run, self.settings = run, tuple(settings)
        self.name = PREFIX + run
        self._start: dict = {}

    def setup(self, worker) -> None:
        run_scope.add(self.run, self.settings)
        self._start = _spent()

    def teardown(self, worker) -> None:
        run_scope.remove(self.run)

    def spent(self) -> dict:
        """What this worker's LLMs were asked since the run's settings arrived."""
        now = _spent()
        return {k: v - self._start.get(k, 0) for k, v in now.items()}


def _worker_spent(client_pid: int, name: str, dask_worker) -> dict:
    # A worker in the run's own process (a threads-only LocalCluster) counted into its counts already.
    plugin = dask_worker.plugins.get(name)
    return plugin.spent() if isinstance(plugin, WorkerSettings) and os.getpid() != client_pid else {}


def hand_over(client, run: str) -> WorkerSettings:
    """This process's settings to every worker process, present and joining, as run `run`'s."""
    plugin = WorkerSettings(run, current())
    client.register_plugin(plugin)
    return plugin


def give_back(client, plugin: WorkerSettings) -> None:
    """The run's settings gone from the workers (the plugin's teardown), once the run is over."""
    with suppress(Exception):  # a scheduler gone by now: its workers went with it
        client.unregister_worker_plugin(plugin.name)


def collect(client, plugin: WorkerSettings) -> None:
    """Add what the workers' LLMs were asked during the run to this process's counts and ledger,
    which the run's `LLM:` line reads. A worker gone by now took its counts with it."""
    try:
        per_worker = client.run(_worker_spent, os.getpid(), plugin.name, on_error="return")
    except Exception:  # noqa: BLE001 - a scheduler gone by now: the line says this process's alone
        return
    for spent in per_worker.values():
        if not isinstance(spent, dict):
            continue
        for k in LLM_COUNTS:
            COUNTS[k] += spent.get(k, 0)
        ledger().absorb(spent.get("tokens", 0), spent.get("dollars", 0.0), spent.get("unpriced", 0))
