"""Prefect tasks: one per stage per shard of units, each a thin wrapper over `autoexplain`.

What the wrappers add:
- caching by content (`tasks.caching`): the cache key hashes the task's parameters (which carry
  the upstream outputs' content hashes, never tensors), the code identity of the library functions
  the stage runs (`autoexplain.identity`, the same as in the library's own keys), and the prompt
  files it reads. Prefect's TASK_SOURCE would hash only this wrapper's source;
- retries with exponential backoff and jitter for transient failures; bad input (`UserError`) and
  contract violations fail at once;
- a data contract (a Great Expectations suite from `schemas/`; a passing table is certified in
  polars, GX reports the failures) checked by the store on every output before it is sealed and on
  every input before it is read (`schemas.gate`), so before any downstream task sees it, with a
  markdown artifact of the failures.

Each task returns a small reference: `{"uri", "path", "key", "layer"}`. `out` may be an fsspec URL:
tasks then work in its local mirror (`autoexplain.remote`), `path` is in the mirror and `uri` is the
folder's URL, from which a task on another machine pulls it (`local_ref`).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from autoexplain import interrupt
from autoexplain import layer as layer_mod
from autoexplain import progress as progress_mod
from autoexplain import registry, remote, run_scope
from autoexplain.counters import COUNTS
from autoexplain.errors import UserError
from autoexplain.llm import limits_now
from autoexplain.pipeline import ExplainConfig
from autoexplain.registry import explainer_prompt, simulator_identity
from autoexplain.record import RecordConfig, build_windows, corpus_identity, record_sources
from autoexplain.source_coder import open_unit_source
from autoexplain.sources import MLP
from autoexplain.storage import local_ref, open_root
from autoexplain.schemas.contracts import ContractViolation
from autoexplain.tasks.caching import RETRY, cache_key


def _progress(stage: str, key: str):
    """A stage's progress callback: a log line every 10 % with an ETA, and an event for listeners
    in this process (the CLI's progress bars)."""
    throttle = progress_mod.Throttle(get_run_logger().info, f"{stage} {key}".strip())

    def report(done: int, total: int) -> None:
        throttle(done, total)
        progress_mod.report(stage, done, total, key)

    return report


def _shard(records: dict, layer: int, units: list[int]) -> str:
    """A shard's name in the logs and progress events: one of its own in a run of several layers and
    sources (the CLI's bars add up the shards by name)."""
    kind = records.get("source", MLP.kind)
    span = f"units {units[0]}-{units[-1]}" if units else "units"
    return f"layer {layer} {span}" if kind == MLP.kind else f"layer {layer} {kind} {span}"


def ref(stage_ref) -> dict:
    path = Path(stage_ref.path if hasattr(stage_ref, "path") else stage_ref.directory).resolve()
    return {"uri": remote.uri(path.parent), "path": str(path), "key": stage_ref.key, "layer": stage_ref.layer}


# One lock for every model in the process, taken to load one and to call one. Prefect's default
# task runner runs the shards' tasks in threads, and `lru_cache` does not stop two threads from
# loading at once; loading is not thread-safe: transformers' `from_pretrained(dtype=...)` switches
# torch's process-wide default dtype while it builds a model, so a concurrent load or forward pass
# sees the wrong one ("expected m1 and m2 to have the same dtype"), and two overlapping loads can
# leave it switched for good.
_MODELS = threading.RLock()


def _one_line_failures(fn):
    """A task body whose UserError ends the task in a Failed state carrying that one line: Prefect
    then logs the line, not a traceback, and the error is not retried (see `_transient`)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            return Failed(message=str(e), data=e)
        except ContractViolation as e:  # the store refused to seal an output (`schemas.gate`)
            where = getattr(e, "path", None)
            create_markdown_artifact(e.report.to_markdown(), key=f"contract-{e.report.suite}",
                                     description=f"{e.report.suite} contract failed for {where}")
            return Failed(message=f"{where} breaks its data contract: " + "; ".join(e.report.failures), data=e)

    return run


def in_run_settings(fn):
    """A task body that reads its own run's LLM settings: on a dask worker that keeps them (the run
    handed them over, `run_settings`), those of the flow run the task belongs to, whatever other run
    shares the worker; elsewhere the process's environment (`run_scope`)."""
    from prefect.context import TaskRunContext

    @functools.wraps(fn)
    def run(*args, **kwargs):
        context = TaskRunContext.get()
        with run_scope.scope(str(context.task_run.flow_run_id) if context is not None else None):
            return fn(*args, **kwargs)

    return run


def _one_at_a_time(fn):
    """Run a stage task's body under the same lock, so a process runs one shard's stage at a time.

    The stages are Python-bound (the GIL), and their model calls are serialised anyway: six scoring
    shards in six threads took 59 s against 34 s one after another (2 cores), from contention alone.
    Processes (the Dask runner) are how shards use more cores."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _models_lock():
            return fn(*args, **kwargs)

    return run


def _one_at_a_time_unless_server(fn):
    """`_one_at_a_time`, except for a simulator that asks a server: its shards overlap, so that the
    next shard's units fill the request slots that a shard's last units leave idle. They share one
    LLM object (`simulator_for`), hence one concurrency limit, and their work here is light."""
    serial = _one_at_a_time(fn)

    @functools.wraps(fn)
    def run(records, explanations, simulator, *args, **kwargs):
        if simulator_for(simulator_identity(simulator)).thread_safe:
            return fn(records, explanations, simulator, *args, **kwargs)
        return serial(records, explanations, simulator, *args, **kwargs)

    return run


def _models_lock() -> threading.RLock:
    """The lock, reached through a module function: dask pickles a task's function by value, and a
    lock it captured directly cannot be pickled; a module function is pickled by reference."""
    return _MODELS


def load_once(fn, limited=None, maxsize: int = 4, locked: bool = True):
    """fn(spec), made once per process (`locked`: under the models lock). `limited(spec)`: what it
    makes asks a server LLM, whose limits are fixed when it is made (`llm.set_limits`): made again
    when they change (a later run in a notebook), and one for each run on a dask worker that serves
    several (`run_settings`: each run's limits its own, and its response cache or none)."""
    cached = lru_cache(maxsize=maxsize)(lambda spec, limits: fn(spec))

    @functools.wraps(fn)  # the same name, so that dask workers unpickle it by reference
    def load(spec: str):
        with _MODELS if locked else nullcontext():
            server = limited is not None and limited(spec)
            return cached(spec, (limits_now(), run_scope.current()) if server else None)

    load.cache_info, load.cache_clear = cached.cache_info, cached.cache_clear
    return load


@load_once
def _subject(model: str):
    from autoexplain.subject import load_subject

    return load_subject(model)


class _Serialised:
    """One shared model per process, used by one task thread at a time: concurrent forward passes
    through one transformers model are not safe (lazy caches), and two cores gain nothing from them."""

    def __init__(self, inner):
        self._inner, self._lock = inner, _MODELS

    @property
    def __class__(self):
        # isinstance sees the wrapped component: a serialised Explainer is an Explainer.
        return type(self._inner)

    # What reads no model, and may be called from a stage's unit threads while the stage's own
    # thread holds the lock for the gathered model calls (`rendezvous`): locking it would deadlock.
    UNLOCKED = frozenset({"dollars"})

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if not callable(value) or name in self.UNLOCKED or self._inner.thread_safe:  # a server LLM: no lock
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)

        return locked


@functools.partial(load_once, limited=lambda spec: registry.uses_server(explainer=spec))
def llm_for(spec: str):
    return _Serialised(registry.make_explainer(spec))


@functools.partial(load_once, limited=lambda identity: registry.uses_server(simulator=registry.simulator_of(identity)))
def simulator_for(identity: str):
    # Keyed by the identity, prompt hash included: a process that outlives a prompt edit (a worker,
    # a notebook) must not keep simulating with the prompt it read first.
    return _Serialised(registry.make_simulator(registry.simulator_of(identity)))


def own_simulator(spec: str):
    """The shared simulator or, for the embedding simulator, a twin of it with the same loaded model
    and empty caches: one shard's simulations then depend on that shard alone, not on which shards
    this process (a task thread pool or a dask worker) simulated before."""
    shared = simulator_for(simulator_identity(spec))
    with _MODELS:
        twin = shared._inner.fresh()  # `Simulator.fresh`: itself, for a simulator without caches
    return shared if twin is shared._inner else _Serialised(twin)


def warm_up(simulator: str | None = None) -> threading.Thread:
    """Load, in a background thread, what a flow run's first shard would otherwise wait for: the
    simulator (for the default, MiniLM and its class vectors; importing sentence-transformers alone
    takes about 4 s) and matplotlib. Not Great Expectations: a contract that holds is certified
    without it (`schemas.contract_fast`), so a run imports it only to report a failure. The CLI calls
    it before it starts a flow, while Prefect's ephemeral server starts up (about 4 s in which this
    process only waits). A failure here is left for the stage that needs the thing to report."""

    def load():
        try:
            own_simulator(simulator)
            from autoexplain.plots import pyplot

            pyplot()
        except Exception:  # noqa: BLE001 - the stage that needs it raises the real error
            pass

    thread = threading.Thread(target=load, name="autoexplain-warm-up", daemon=True)
    thread.start()
    return thread


def _recorded_from(p: dict) -> dict:
    """A recording's parameters with the model and corpus by content, not by path: the same path
    edited in place must not answer with the recording of what it held before."""
    from autoexplain.subject import fingerprint_of

    return {**p, "model": fingerprint_of(p["model"]), "corpus": corpus_identity(p["corpus"])}


RECORDING_KEY = cache_key("record", (build_windows, record_sources, open_unit_source), inputs=_recorded_from)


@task(name="record", cache_key_fn=RECORDING_KEY, **RETRY)
@_one_line_failures
def record_task(model: str, corpus: str, layers: list[int], tokens: int, out: str, window_len: int = 64,
                top_k: int = 40, n_random: int = 30, seed: int = 0, source: str = "mlp",
                source_id: str = "mlp", text_field: str = "text") -> dict:
    """`source_id` (`LayerPlan.source_id`) is what the units depend on of `source` (a coder's
    weights): part of the task's cache key, so new weights at the same path record anew.
    `text_field`: the field that holds the text in a .jsonl, .parquet or hub corpus."""
    return _record(model, corpus, [(source, layers)], tokens, out, window_len, top_k, n_random, seed, text_field)[0]


@task(name="record-sources", cache_key_fn=RECORDING_KEY, **RETRY)
@_one_line_failures
def record_sources_task(model: str, corpus: str, sources: list[tuple[str, list[int], str]], tokens: int, out: str,
                        window_len: int = 64, top_k: int = 40, n_random: int = 30, seed: int = 0,
                        text_field: str = "text") -> list[dict]:
    """`record_task` for several sources at once, from one pass of the subject: `sources` are
    (source, its layers, its source_id); one reference each, in order."""
    return _record(model, corpus, [(spec, layers) for spec, layers, _id in sources], tokens, out, window_len, top_k,
                   n_random, seed, text_field)


def _record(model: str, corpus: str, sources: list[tuple[str, list[int]]], tokens: int, out: str, window_len: int,
            top_k: int, n_random: int, seed: int, text_field: str) -> list[dict]:
    from autoexplain.preflight import flow_name
    from autoexplain.subject import PlannedSubject

    out = open_root(out)
    subject = PlannedSubject(model, _subject)  # loaded only if something must be recorded
    plans = []
    for spec, layers in sources:
        subject.check_layers(layers)
        plans.append((open_unit_source(spec, model, layers[0] if len(layers) == 1 else None),
                      RecordConfig(layers, top_k=top_k, n_random=n_random, seed=seed)))
    # A corpus error found past the preflight (a later JSONL line) names the flow parameter; the CLI respells it.
    windows = build_windows(subject, corpus, out, window_len, tokens, seed, text_field, flow_name)
    if windows.notice:
        get_run_logger().warning(windows.notice)
    recorded = record_sources(subject, windows, plans, out, _progress("record", "tokens"))
    return [{"uri": remote.uri(records.directory), "path": str(records.directory.resolve()),
             "key": records.key, "layers": records.layers, "n_units": unit_source.n_units(subject),
             "source": unit_source.kind, "windows": str(windows.path.resolve()), "window_len": window_len}
            for (unit_source, _cfg), records in zip(plans, recorded)]


@task(name="explain", cache_key_fn=cache_key("explain", (layer_mod.run_explain,), lambda p: explainer_prompt(p["explainer"])),
      **RETRY)
@_one_line_failures
@in_run_settings
@_one_at_a_time
def explain_task(records: dict, layer: int, units: list[int], explainer: str, k: int = 4, out: str = "out") -> dict:
    log = get_run_logger()
    records, out = local_ref(records), open_root(out)
    result = layer_mod.run_explain(records["path"], layer, out, units, explainer, ExplainConfig(k=k),
                                   make_llm=lambda: llm_for(explainer),
                                   progress=_progress("explain", _shard(records, layer, units)))
    log.info(f"explained units {units[0]}..{units[-1]} of layer {layer}")
    return ref(result)


@task(name="revise", cache_key_fn=cache_key("revise", (layer_mod.run_revise,)), **RETRY)
@_one_line_failures
def revise_task(explanations: dict, revisions: dict[str, str], out: str = "out") -> dict:
    from autoexplain.preflight import check_revisions

    parsed = check_revisions(revisions, None)
    explanations, out = local_ref(explanations), open_root(out)
    result = layer_mod.run_revise(layer_mod.StageRef.of(Path(explanations["path"]).parent), parsed, out)
    return ref(result)


@task(name="simulate", cache_key_fn=cache_key("simulate", (layer_mod.run_simulate,), ""), **RETRY)
@_one_line_failures
@in_run_settings
@_one_at_a_time_unless_server
def simulate_task(records: dict, explanations: dict, simulator: str, simulator_id: str, out: str = "out") -> dict:
    records, explanations, out = local_ref(records), local_ref(explanations), open_root(out)
    result = layer_mod.run_simulate(records["path"], layer_mod.StageRef.of(Path(explanations["path"]).parent), out,
                                    sim=own_simulator(simulator),
                                    progress=_progress("simulate", f"layer {explanations['layer']} {explanations['key'][:8]}"))
    return ref(result)


_SCORER: ProcessPoolExecutor | None = None
_SCORER_LOCK = threading.Lock()
# Simulation rows times bootstrap resamples from which a shard is scored in the worker: about 2 s of
# scoring on one core. The worker's start (a spawned interpreter importing torch and polars) costs
# about 4 s of CPU, more than overlapping a smaller shard's scoring with the next shard could save.
SCORE_ELSEWHERE_FROM = 4_000_000


def _score(records_dir, simulations, out, n_boot: int, here: bool = False):
    """`run_score` in a long-lived worker process, so that a shard's scoring runs on the second core
    while the next shard is simulated here (both stages are Python-bound: threads would share one
    core). It runs here, under the stage lock, when `here` is set (outputs under a URL: their mirror
    is registered in this process only), in a daemonic process (a dask worker), which may not start
    children, for a shard too small to be worth the worker (`SCORE_ELSEWHERE_FROM`), or with
    AUTOEXPLAIN_SCORE_WORKER=0. Either way the scores are the same bytes. The worker's call counts are
    added to this process's."""
    global _SCORER
    args = (records_dir, simulations, out, n_boot)
    if here or multiprocessing.current_process().daemon or os.environ.get("AUTOEXPLAIN_SCORE_WORKER", "1") == "0" \
            or _simulation_rows(simulations) * n_boot < SCORE_ELSEWHERE_FROM:
        with _MODELS:
            return layer_mod.run_score(*args)
    with _SCORER_LOCK:
        if _SCORER is None:
            _SCORER = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=interrupt.ignore_ctrl_c)
        scorer = _SCORER
    try:
        result, counts = scorer.submit(layer_mod.run_score_counted, *args).result()
    except BrokenProcessPool:
        with _SCORER_LOCK:  # the worker died (killed, out of memory): the retry starts a new one
            if _SCORER is scorer:
                _SCORER = None
        raise
    COUNTS.update(counts)
    return result


def _simulation_rows(simulations: layer_mod.StageRef) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(simulations.path).metadata.num_rows


@task(name="score", cache_key_fn=cache_key("score", (layer_mod.run_score,)), **RETRY)
@_one_line_failures
def score_task(records: dict, simulations: dict, n_boot: int = 1000, out: str = "out") -> dict:
    log = get_run_logger()
    on_url = remote.is_url(out)
    records, simulations, out = local_ref(records), local_ref(simulations), open_root(out)
    result = _score(records["path"], layer_mod.StageRef.of(Path(simulations["path"]).parent), out, n_boot,
                    here=on_url)
    log.info(f"scored {simulations['path']}")
    return ref(result)


# For the tasks of other modules (`tasks.classify`): the same failure handling, locking and progress
# as these.
one_line_failures, one_at_a_time, stage_progress = _one_line_failures, _one_at_a_time, _progress
