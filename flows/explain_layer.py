"""Flows: composition only. Every step is a task from `tasks/`.

- `record-activations`: record one or more layers.
- `explain-layer`: record if needed, then explain, simulate and score each shard of units, publish
  the outputs as assets and write the report.
- `rescore`: re-simulate and re-score existing explanations (a new simulator, or the same one
  after a prompt edit). The nightly job.

`out` is a folder or an fsspec URL (outputs pushed there, see `autoexplain.remote`); `results`, a
folder or URL where Prefect keeps the tasks' results (its cache), else Prefect's default storage.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from autoexplain import progress
from autoexplain.errors import UserError
from autoexplain.layer import parse_units
from autoexplain.remote import is_url
from autoexplain.storage import open_root
from tasks.report import publish, report_task, view_task
from tasks.stages import (
    explain_task,
    record_task,
    revise_task,
    score_task,
    simulate_task,
    simulator_identity,
    with_results,
)


def _check(name: str, value: int, low: int = 1) -> None:
    if value < low:
        raise UserError(f"parameter {name} must be at least {low}, got {value}", f"pass {name} >= {low}")


def _out(out: str) -> str:
    """A folder made absolute (tasks may run elsewhere), or a URL as given, checked before any task."""
    if is_url(out):
        open_root(out)
        return out
    return str(Path(out).resolve())


@flow(name="record-activations", validate_parameters=True)
def record_activations(model: str = "smollm2", corpus: str = "default", layers: list[int] | None = None,
                       tokens: int = 1_000_000, out: str = "out") -> dict:
    _check("tokens", tokens)
    return record_task(model, corpus, layers or [15], tokens, _out(out))


@flow(name="explain-layer", validate_parameters=True)
def explain_layer(
    layer: int = 15,
    units: str | None = None,
    model: str = "smollm2",
    corpus: str = "default",
    tokens: int = 1_000_000,
    explainer: str = "embedding",
    simulator: str = "embedding",
    k: int = 4,
    shard_size: int = 256,
    n_boot: int = 1000,
    out: str = "out",
    revisions: dict[str, str] | None = None,
    site: str | None = None,
    window_len: int = 64,
    top_k: int = 40,
    n_random: int = 30,
    results: str | None = None,
) -> dict:
    """Explain every unit (both polarities) of one layer, or a unit range like '0-99'."""
    log = get_run_logger()
    for name, value in (("tokens", tokens), ("k", k), ("shard_size", shard_size), ("n_boot", n_boot),
                        ("window_len", window_len), ("top_k", top_k)):
        _check(name, value)
    _check("layer", layer, 0)
    out = _out(out)
    record, explain, revise, simulate, score = with_results(results, record_task, explain_task, revise_task,
                                                            simulate_task, score_task)
    records = record(model, corpus, [layer], tokens, out, window_len, top_k, n_random)
    chosen = parse_units(units, records["n_units"])
    shards = [chosen[i : i + shard_size] for i in range(0, len(chosen), shard_size)]
    sim_id = simulator_identity(simulator)
    revisions = revisions or {}

    started, futures = time.perf_counter(), []
    for shard in shards:
        x = explain.submit(records, layer, shard, explainer, k, out)
        mine = {key: text for key, text in revisions.items() if int(key.partition(":")[0]) in shard}
        if mine:
            x = revise.submit(x, mine, out)
        s = simulate.submit(records, x, simulator, sim_id, out)
        futures.append((shard, x, s, score.submit(records, s, n_boot, out)))

    done_units, outputs, scores = 0, [], []
    by_future = {f[3]: f for f in futures}
    for fut in as_completed([f[3] for f in futures]):
        shard, x, s, c = by_future[fut]
        done_units += len(shard)
        elapsed = time.perf_counter() - started
        eta = elapsed / done_units * (len(chosen) - done_units)
        log.info(f"units {done_units}/{len(chosen)} done (shard {shard[0]}-{shard[-1]}); ETA {eta:.0f}s")
        progress.report("scored", done_units, len(chosen))
        xr, sr, cr = x.result(), s.result(), c.result()
        publish(xr, [records])
        publish(sr, [records, xr])
        publish(cr, [sr])
        outputs += [xr, sr, cr]
        scores.append(cr)
    # Several shards of one layer are one layer to the viewer: it reads every shard's scores.
    site_uri = view_task(scores, site or f"{out.rstrip('/')}/site/layer_{layer}", records) if site != "none" else None
    report = report_task(records, outputs, scores, site_uri)
    return {"records": records, "scores": scores, "report": report}


@flow(name="rescore", validate_parameters=True)
def rescore(explanations: list[str], records: str, simulator: str = "embedding", n_boot: int = 1000,
            out: str = "out", window_len: int = 64) -> dict:
    """Re-simulate and re-score explanation outputs (paths of explanations folders)."""
    from autoexplain.storage import read_manifest

    if not explanations:
        raise UserError("rescore needs at least one explanations folder", "pass explanations=[...]")
    out = _out(out)
    rec_dir = Path(records).resolve()
    manifest = read_manifest(rec_dir)
    rec = {"uri": rec_dir.as_uri(), "path": str(rec_dir), "key": manifest["key"], "window_len": window_len}
    sim_id = simulator_identity(simulator)
    scores = []
    for folder in explanations:
        m = read_manifest(folder)
        path = Path(folder).resolve() / f"layer_{m['params']['layer']}.parquet"
        x = {"uri": path.parent.as_uri(), "path": str(path), "key": m["key"], "layer": m["params"]["layer"]}
        s = simulate_task(rec, x, simulator, sim_id, out)
        scores.append(score_task(rec, s, n_boot, out))
    report_task(rec, scores, scores)
    return {"scores": scores}
