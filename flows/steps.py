"""The steps that the explain-layer, explain-model and rescore flows compose, one layer's units at a time.

A layer's work is submitted as shards (explain -> [revise] -> simulate -> score), all of them before
any is waited for, so the task runner (threads, or dask workers) keeps every shard of every layer
in flight. `gather` then takes shards as they finish, from any layer, and `finish_layer` writes a
layer's report and run pointer once all of its shards are in.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

from prefect import get_run_logger
from prefect.futures import as_completed

from autoexplain import progress
from autoexplain.errors import UserError
from autoexplain.indices import parse_units
from autoexplain.layer import dead_units
from autoexplain.preflight import flow_name, for_parameter, refuse
from autoexplain.registry import DEFAULT_SCORER, parse_scorers, simulator_identity
from autoexplain.remote import is_url
from autoexplain.server_probe import check_workers_reach
from autoexplain.sources import MLP
from autoexplain.storage import layer_name, local_ref, open_root, unanswered, write_run
from autoexplain.tasks.classify import agreement_task, classify_task, negatives_task, scores_task
from autoexplain.tasks.report import publish, report_task
from autoexplain.tasks.caching import with_results
from autoexplain.tasks.stages import explain_task, revise_task, score_task, simulate_task

T = TypeVar("T")


@dataclass
class LayerWork:
    """One layer's units of one source, in flight: its shards' futures, then their results."""

    layer: int
    kind: str
    records: dict
    chosen: list[int]
    dead: list[int]
    shards: list = field(default_factory=list)  # (units, explain, simulate, score, asked) futures
    explained: dict = field(default_factory=dict)  # first unit of a shard -> result reference
    simulated: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)

    def in_order(self, done: dict) -> list[dict]:
        return [done[k] for k in sorted(done)]  # shard order, not finishing order

    def never_fired(self) -> dict:
        """This layer's units that never fired, for the site and the summary: only the units asked
        for, not every dead latent of the recording."""
        return {"layer": self.layer, "kind": self.kind, "records": self.records, "units": self.dead,
                "asked": len(self.chosen) + len(self.dead)}


def scale_out(dask: str | None, work: Callable[[], T]) -> T:
    """work(), its tasks run on the dask scheduler at `dask` (checked by the preflight; None: on the
    flow's own task runner), and wherever they run they report to this flow run's Prefect API. A
    task on a dask worker talks to the API named in the flow's settings; with none there (Prefect's
    temporary server, found by the flow's client), every worker process would start a temporary
    server of its own and record its task runs there. Workers on other machines with an API on this
    machine's loopback stop the run (`server_probe.check_workers_reach`): those present before any
    work, and those that join later (an adaptive cluster often starts with none) when they join."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run = FlowRunContext.get()
    stopped: list[UserError] = []
    with ExitStack() as stack:
        if not PREFECT_API_URL.value():
            stack.enter_context(temporary_settings({PREFECT_API_URL: str(run.client.api_url).rstrip("/")}))
        if dask:
            from prefect_dask import DaskTaskRunner

            runner = stack.enter_context(DaskTaskRunner(address=dask))
            try:  # connect now, before any work, not at the first shard's submit
                runner.client  # noqa: B018
            except Exception as e:  # something answers there, but no dask scheduler (the preflight saw it listen)
                raise refuse(flow_name, "dask", f"no dask scheduler at {dask} ({type(e).__name__}: {str(e)[:120]})",
                             "give the dask scheduler's address, e.g. tcp://HOST:8786") from None
            stack.callback(_watch_joiners(runner.client, PREFECT_API_URL.value(), stopped))  # before the snapshot: none slips by
            try:
                check_workers_reach([w.get("host") for w in runner.client.scheduler_info()["workers"].values()],
                                    PREFECT_API_URL.value())
            except UserError as e:
                raise for_parameter(flow_name, "dask", e) from None
            _hand_settings(runner.client, str(run.flow_run.id), stack)
            stack.enter_context(run.model_copy(update={"task_runner": runner}))
        try:
            return work()
        except Exception:
            if stopped:  # the run's futures were cancelled for this: say why, not what the cancelling broke
                raise stopped[0] from None
            raise


def _hand_settings(client, run: str, stack: ExitStack) -> None:
    """The run's LLM settings (limits, timeout, response cache) in every worker process, present and
    joining, under the run's name while it lasts: its tasks read them (`tasks.stages.in_run_settings`),
    another run's tasks their own. At its end, what the workers' LLMs were asked joins this process's
    counts, which the run's `LLM:` line reads (`autoexplain.run_settings`)."""
    from autoexplain import run_settings

    plugin = run_settings.hand_over(client, run)
    stack.callback(run_settings.give_back, client, plugin)  # after the counts are read (callbacks run last first)
    stack.callback(run_settings.collect, client, plugin)


def _watch_joiners(client, api_url: str, stopped: list[UserError]) -> Callable[[], None]:
    """Check every worker that joins the scheduler from now on as the present ones are checked: one
    on another machine appends its line to `stopped` and cancels the client's futures, so that whatever
    the flow waits on returns (its tasks there would never report). Returns the unsubscribe."""
    import threading

    from distributed import Future
    from distributed.comm import get_address_host

    def joined(event) -> None:
        _, msg = event
        if not isinstance(msg, dict) or msg.get("action") != "add-worker" or stopped:
            return
        try:
            check_workers_reach([get_address_host(msg["worker"])], api_url)
        except UserError as e:
            stopped.append(for_parameter(flow_name, "dask", e))
            # not on the client's event loop, which this handler runs on and `cancel` waits for
            threading.Thread(target=lambda: client.cancel([Future(k, client) for k in list(client.futures)],
                                                         reason="a worker joined that cannot reach the Prefect API"),
                             daemon=True, name="autoexplain-cancel").start()

    def unsubscribe() -> None:
        with suppress(Exception):  # a scheduler gone by now: nothing is left to unsubscribe from
            client.unsubscribe_topic("all")

    client.subscribe_topic("all", joined)
    return unsubscribe


def unit_keys(revisions: dict[tuple[int, int], str]) -> dict[str, str]:
    return {f"{u}:{p:+d}": text for (u, p), text in sorted(revisions.items())}


def submit_layer(records: dict, layer: int, kind: str, units: list[int] | None, revisions: dict, *, explainer: str,
                 simulator: str, scorers: str, model: str, k: int, shard_size: int, n_boot: int, out: str,
                 results: str | None, source: str | None = None) -> LayerWork:
    """Submit every shard of a recorded layer; units that never fired are left out (and counted).
    `source`: the units' source as the run was given it (see `score_shard`)."""
    explain, revise, simulate, score = with_results(results, explain_task, revise_task, simulate_task, score_task)
    chosen = units if units is not None else parse_units(None, records["n_units"])
    dead = sorted(set(dead_units(local_ref(records)["path"], layer)) & set(chosen))
    if dead:  # latents that never fired: their statistics say so, and there is nothing to explain
        get_run_logger().info(f"layer {layer} ({kind}): {len(dead)} of {len(chosen)} units never fired in the "
                              "recorded tokens and are not explained")
        chosen = [u for u in chosen if u not in set(dead)]
    work = LayerWork(layer, kind, records, chosen, dead)
    sim_id = simulator_identity(simulator)
    for shard in [chosen[i : i + shard_size] for i in range(0, len(chosen), shard_size)]:
        x = explain.submit(records, layer, shard, explainer, k, out)
        mine = {key: text for key, text in revisions.items() if key[0] in shard}
        if mine:
            x = revise.submit(x, unit_keys(mine), out)
        s = simulate.submit(records, x, simulator, sim_id, out)
        work.shards.append((shard, x, s, *score_shard(records, s, scorers, model, n_boot, out, score, results, source)))
    return work


def gather(works: list[LayerWork], what: str = "units") -> None:
    """Wait for every shard of every layer, in the order they finish; publish each shard's outputs
    as assets and report progress over all of them (the log line and the `what` bar)."""
    log = get_run_logger()
    by_future = {shard[3]: (work, shard) for work in works for shard in work.shards}
    total, done, started, eta = sum(len(w.chosen) for w in works), 0, time.perf_counter(), progress.Eta()
    for fut in as_completed(list(by_future)):
        work, (units, x, s, c, asked) = by_future[fut]
        xr, sr = x.result(), s.result()  # a failed shard raises here, before it counts as done
        for a in asked:  # a failed scorer raises its one line here, not the gathering's wait
            a.result()
        cr = c.result()
        done += len(units)
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed else float("nan")
        log.info(f"{what} {done}/{total} done ({rate:.2f}/s; layer {work.layer} {work.kind} shard {units[0]}-{units[-1]}); "
                 f"{eta(done, total)}")
        progress.report(what, done, total)
        publish(xr, [work.records])
        publish(sr, [work.records, xr])
        publish(cr, [sr])
        work.outputs += [xr, sr, cr]
        work.explained[units[0]], work.simulated[units[0]], work.scores[units[0]] = xr, sr, cr


def finish_layer(work: LayerWork, flow: str, params: dict, out: str, site_dir: str | None, site_uri: str | None,
                 scorers: str, extra: dict | None = None) -> dict:
    """The layer's report artifact, its agreement page (when other scorers ran) and its run pointer,
    which `rescore` and `revise` start from."""
    scores = work.in_order(work.scores)
    report = report_task(work.records, work.outputs, scores, site_uri, work.layer, work.dead)
    agreement(scorers, scores, out, work.layer, site_dir, work.kind)
    run = {"flow": flow, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "params": params,
           "records": work.records, "explanations": work.in_order(work.explained),
           "simulations": work.in_order(work.simulated), "scores": scores, "site_dir": site_dir, "site": site_uri,
           "dead": work.dead, **(extra or {})}
    write_run(open_root(out), work.layer, run, kind=work.kind)
    return report


def score_shard(records, s, scorers: str, model: str | None, n_boot: int, out: str, score, results,
                source: str | None = None):
    """A shard's score future: the simulation scorer's alone (the default, as it always was), or
    every scorer asked for gathered into one scores output (`classify_stage.run_scores`); and the
    futures it waits for. `source`: as the run was given it, a coder where it is now (a recording
    reused from a run that read the same file elsewhere names that path), for the hard negatives."""
    if only_default(scorers):
        return score.submit(records, s, n_boot, out), []
    from autoexplain.classify_stage import scorer_identity

    specs = [p.spec for p in parse_scorers(scorers)]
    negatives, classify, gather_scores = with_results(results, negatives_task, classify_task, scores_task)
    sim_scores = score.submit(records, s, n_boot, out) if DEFAULT_SCORER in specs else None
    near = negatives.submit(records, s, model, out, source)
    asked = [classify.submit(records, s, spec, scorer_identity(spec), near, out) for spec in specs if spec != DEFAULT_SCORER]
    # the negatives first: failed, they leave the classify tasks unrun, whose wait would raise that
    # they never ran instead of the negatives' own line
    return gather_scores.submit(records, s, asked, sim_scores, n_boot, out), [near, *asked] + ([sim_scores] if sim_scores else [])


def only_default(scorers: str) -> bool:
    return [p.spec for p in parse_scorers(scorers)] == [DEFAULT_SCORER]


def site_pages(scorers: str) -> list[tuple[str, str]]:
    """Pages that a layer's site links from its overview: the scorers' agreement, when it is written."""
    return [] if only_default(scorers) else [("agreement.html", "Agreement between scorers")]


def agreement(scorers: str, scores: list[dict], out: str, layer: int, site_dir: str | None, kind: str = MLP.kind) -> None:
    """The agreement between scorers when any but the default ran: an artifact, and a page with the
    scatter plot in the layer's site folder (or under `out`/agreement without a local site)."""
    if only_default(scorers) or not scores:  # no unit explained: nothing to agree on
        return
    folder = site_dir if site_dir and not is_url(site_dir) else None
    if folder is None and not is_url(out):
        folder = str(Path(out) / "agreement" / layer_name(layer, kind))
    if folder is not None:
        agreement_task(scores, folder)


def finished(result: dict):
    """A run's result with the count of results (rows) behind its scores that got no LLM answer
    (`unanswered`); where there are some, a Completed state named Incomplete that says so, its data
    that result: what a deployment's run shows, where no exit code is seen (the CLI reads the count
    and says it with exit code 4: `console.unanswered_exit`)."""
    from prefect.states import Completed

    n = sum(unanswered(Path(local_ref(ref)["path"]).parent) for ref in result.get("scores", []))
    result = {**result, "unanswered": n}
    if not n:
        return result
    return Completed(name="Incomplete", data=result,
                     message=f"{n:,} results got no LLM answer (the server was down, overloaded or answered blank), so their units "
                             "are undefined; run the flow again: it asks only for those again")
