"""Explain a layer: the explain, simulate and score stages with their content-addressed outputs.

Each `run_*` function reads its inputs from disk, calls the pure stage function in `pipeline`,
and writes `<out>/<stage>/<key>/layer_<L>.parquet` plus a manifest. The key hashes the inputs'
keys, the parameters, the prompt hashes and the code version, so a rerun with nothing changed
returns at once and an edit recomputes only the stages downstream of it.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from operator import itemgetter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from autoexplain import collector, files, layout, llm_cache, pipeline
from autoexplain.activations import read_units
from autoexplain.counters import COUNTS
from autoexplain.records import UnitId, UnitRecords
from autoexplain.errors import NO_ANSWER, UserError
from autoexplain.explain import as_explainer
from autoexplain.identity import code_identity
from autoexplain.registry import (DEFAULT_EXPLAINER, explainer_prompt, explainer_weights, keyed_spec, make_explainer,
                                  make_simulator, parse_explainer)
from autoexplain.rows import stamped, table_rows
from autoexplain.sources import MLP, polarities_of
from autoexplain.storage import ANY_STAGE, content_key, read_manifest, require_complete, require_recording
from autoexplain.memo import Memo
from autoexplain.store import Stage
from autoexplain.text_vectors import explanation_texts, use_text_vectors

Progress = Callable[[int, int], None]  # (units done, units in this call)


@dataclass
class StageRef:
    """A finished stage output: its folder, key and the one table file in it."""

    directory: Path
    key: str
    layer: int

    @property
    def path(self) -> Path:
        return layout.table(self.directory, self.layer)

    @classmethod
    def of_stage(cls, stage: Stage, layer: int) -> "StageRef":
        return cls(stage.directory, stage.key, layer)

    @classmethod
    def of(cls, directory: str | Path, stage: str = ANY_STAGE) -> "StageRef":
        directory = require_complete(directory, stage, "point at a folder printed by an earlier autoexplain command")
        m = read_manifest(directory)
        return cls(directory, m["key"], m["params"]["layer"])


def _records_inputs(records_dir: Path, layer: int):
    require_complete(records_dir, "records", "pass the folder printed by `autoexplain record` or explain-layer")
    manifest = read_manifest(records_dir)
    if layer not in manifest["params"]["layers"]:
        raise UserError(f"layer {layer} was not recorded in {records_dir} (it has {manifest['params']['layers']})",
                        "record that layer first, or pass one of the recorded layers")
    windows_dir = layout.sibling(records_dir, "windows", manifest["inputs"]["windows"])
    require_complete(windows_dir, "windows", f"rerun the recording that wrote {records_dir}")
    return (layout.records_table(records_dir, layer), windows_dir / layout.WINDOWS, manifest["key"])


def source_kind(records_dir: str | Path) -> str:
    """The unit source a recording read ('mlp' for every recording before sources had names)."""
    return read_manifest(Path(records_dir))["params"].get("source", MLP.kind)


def load_units(records_dir: str | Path, layer: int, units: list[int] | None = None):
    records_path, windows_path, _ = _records_inputs(Path(records_dir), layer)
    kind = source_kind(records_dir)
    wanted = None if units is None else [(i, p) for i in units for p in polarities_of(kind)]
    stats_path = layout.stats_table(records_dir, layer)
    found = read_units(records_path, windows_path, wanted, stats_path if stats_path.is_file() else None, kind=kind)
    # Every neuron in range has records; a coder's latent that never fired has none (it is dead,
    # which its statistics say), so a shard of dead latents is empty, not an error.
    if units is not None and not found and kind == MLP.kind:
        raise UserError(f"none of units {units[0]}..{units[-1]} exist in layer {layer}", "check --units")
    return found


def recorded_units(records_dir: str | Path, layer: int) -> int:
    """How many units a layer's recording holds (its statistics have a row for each)."""
    import pyarrow.compute as pc

    units = pq.read_table(layout.stats_table(records_dir, layer), columns=["unit"]).column("unit")
    return int(pc.max(units).as_py()) + 1 if len(units) else 0


def dead_units(records_dir: str | Path, layer: int) -> list[int]:
    """A layer's units that never fired in any polarity over the recorded tokens (their statistics'
    max <= 0 each way): latents a coder never used; they have no records and are not explained."""
    import polars as pl

    _records_inputs(Path(records_dir), layer)
    stats = pl.read_parquet(layout.stats_table(records_dir, layer), columns=["unit", "max"])
    return sorted(stats.group_by("unit").agg(pl.col("max").max()).filter(pl.col("max") <= 0)["unit"].to_list())


def dead_of_run(run: dict) -> list[int]:
    """The units a run was asked for that never fired: its pointer's `dead`, or for a pointer written
    before runs kept them (or by `import`), the recording's dead units among the run's `units`. Not
    every dead latent of the recording: a run of units 24-40 says nothing of latent 3."""
    if run.get("dead") is not None:
        return sorted(run["dead"])
    from autoexplain.indices import parse_units
    from autoexplain.storage import local_ref

    records = local_ref(run["records"])
    asked = set(parse_units(run["params"].get("units"), records["n_units"]))
    return [u for u in dead_units(records["path"], run["params"]["layer"]) if u in asked]


def use_word_table(records_dir: Path, out, model) -> None:
    """Give an explainer or simulator that `uses_word_table` the corpus's word table (built on first use)."""
    if not model.uses_word_table:
        return
    from autoexplain.wordvecs import word_table

    windows_key = read_manifest(records_dir)["inputs"]["windows"]
    _, windows_path, _ = _records_inputs(records_dir, read_manifest(records_dir)["params"]["layers"][0])
    model.add_words(*word_table(windows_path, windows_key, out, model))


def _weights(fingerprint: str) -> dict:
    """A local model's weights in a stage's key (`registry.llm_weights`); nothing for the rest."""
    return {"weights": fingerprint} if fingerprint else {}


def key_name(component) -> str:
    """A component's name as content keys take it: its LLM's name in it as the LLM's `key_name`
    ('local' for a model given by path, `Subject.key_name`, whose weights `_weights` holds), so the
    same model in two folders is one key; `registry.keyed_spec` does the same for a spec."""
    llm = component.llm
    name = getattr(llm, "name", "")
    return component.name.replace(name, getattr(llm, "key_name", None) or name) if name else component.name


def _unit_key(records_key: str, unit, **rest) -> str:
    # One records output can hold several layers: the layer is part of a unit's identity.
    n = unit.id
    return content_key({"records": records_key, "unit": [n.layer, n.index, n.polarity], **rest})


def _scope(records_key: str, layer: int) -> str:
    """What a unit's memo index is kept under (`Memo`): every `_unit_key` is a function of it."""
    return f"{records_key}-L{layer}"


def _texts_of(inputs: dict) -> list[str]:
    """The explanation texts a unit's simulate inputs name (candidates, baselines, a control)."""
    return [t for v in inputs.values() for t in ([v] if isinstance(v, str) else v or [])]


def _stamped(result: tuple, prompt: str) -> tuple:
    """A unit's (chosen, simulation rows) with this prompt's hash: rows read back from a run with
    another prompt, which their unit's key says they do not depend on, carry the current one."""
    return result[0], stamped(result[1], "prompt_hash", prompt)


def _no_request_failed(result) -> bool:
    """A unit's simulate result with no record whose LLM request failed for good: worth keeping.
    A unit with one is simulated again on a rerun (its other requests too: they are cheap to redo)."""
    _chosen, sims = result
    return not any((r.get("failure") or "").startswith(NO_ANSWER) for r in sims)


class _Later:
    """A call made when its result is asked for: a future for a loop run in the caller's thread."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        if self.fn is None:
            from concurrent.futures import CancelledError

            raise CancelledError()
        return self.fn(*self.args)

    def cancel(self) -> bool:
        self.fn = None
        return True


def run_explain(records_dir, layer: int, out, units=None, explainer=None, cfg=None, llm=None,
                progress: Progress | None = None, make_llm=None) -> StageRef:
    """make_llm: builds the explainer when no `llm` is given, called only when a unit must be
    explained (a fresh machine that finds the explanations at the URL loads no model)."""
    records_dir = Path(records_dir)
    cfg = cfg or pipeline.ExplainConfig()
    _, _, records_key = _records_inputs(records_dir, layer)
    spec = explainer or DEFAULT_EXPLAINER
    params = {"layer": layer, "units": units, "explainer": spec, "config": asdict(cfg),
              "prompt": explainer_prompt(spec), **_weights(explainer_weights(spec))}
    keyed = {**params, "explainer": keyed_spec(parse_explainer(spec))}  # the manifest keeps the spec as written
    code = code_identity(run_explain)  # the source it reaches (`identity`)
    stage = Stage.open(out, "explanations", {"records": records_key, **keyed}, run_explain)
    ref = StageRef.of_stage(stage, layer)
    if stage.done:
        return ref
    memo = Memo(out, "explain", _scope(records_key, layer))
    unit_params = {k: v for k, v in keyed.items() if k not in ("layer", "units")}
    todo, rows = [], {}
    loaded = load_units(records_dir, layer, units)
    for unit in loaded:
        ukey = _unit_key(records_key, unit, **unit_params, code=code)
        rows[ukey] = memo.get(ukey)
        if rows[ukey] is None:
            todo.append((ukey, unit))
    # Batches of units, several at once for a server explainer (enough to keep its concurrency
    # busy), one after another for a local model. Each batch is memoised as it finishes, in order;
    # when one fails, the batches not started are dropped, the others finish and are kept, and the
    # error is raised: a rerun asks only what was not answered.
    if todo:
        if llm is None:
            llm = make_llm() if make_llm is not None else make_explainer(spec)
        llm = as_explainer(llm)  # an LLM passed in is explained with by the LLM explainer
    size = pipeline.units_per_batch(llm, cfg) if todo else cfg.batch_units
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    if batches:
        llm_cache.attach(llm, out)  # answers paid for are kept under `out` (or where the cache is set)
        use_word_table(records_dir, out, llm)

    def explain_batch(batch):
        return pipeline.explain_stage([u for _, u in batch], llm, cfg).to_pylist()

    done, error = len(loaded) - len(todo), None
    workers = pipeline.explain_workers(llm, cfg) if batches else 1
    # One at a time in this thread for a local model: a flow task holds the models' lock here, and a
    # pool thread that asked for it would wait for ever.
    with ThreadPoolExecutor(max_workers=workers) if workers > 1 else nullcontext() as pool:
        futures = [pool.submit(explain_batch, b) for b in batches] if pool else [_Later(explain_batch, b) for b in batches]
        for batch, future in zip(batches, futures):
            try:
                table = future.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, once the finished batches are kept
                if error is None:
                    error = e
                    for f in futures:
                        f.cancel()
                continue
            for ukey, unit in batch:
                mine = [r for r in table if (r["unit"], r["polarity"]) == (unit.id.index, unit.id.polarity)]
                if not any(r.get("failure") for r in mine):  # a failed explanation is asked again on a rerun
                    memo.put(ukey, mine)
                rows[ukey] = mine
            done += len(batch)
            if progress and error is None:
                progress(done, len(loaded))
    if error is not None:
        raise error
    # the units' results become rows of the sealed table
    stage.table(pipeline.rows_to_table([r for v in rows.values() for r in v], "explanations"), ref.path.name,
                "explanations")
    stage.seal({"records": records_dir}, params, memo)
    return ref


def run_revise(explanations: StageRef, revisions: dict[tuple[int, int], str], out) -> StageRef:
    """Replace some units' LLM explanations by human-written ones (a new explanations output)."""
    table = pq.read_table(explanations.path).to_pylist()
    known = {(r["unit"], r["polarity"]) for r in table}
    for unit_pol in revisions:
        if tuple(unit_pol) not in known:
            raise UserError(f"cannot revise unit {unit_pol[0]} polarity {unit_pol[1]}: it is not in {explanations.directory}",
                            "revise units that were explained")
    for row in table:
        text = revisions.get((row["unit"], row["polarity"]))
        if text is not None and row["method"] == pipeline.EXPLAINER:
            row.update(text=text, candidates=[text], explainer="human", candidate_valid_scores=[], failure=None)
    params = {"layer": explanations.layer, "revisions": sorted([list(k) + [v] for k, v in revisions.items()])}
    stage = Stage.open(out, "explanations", {"explanations": explanations.key, **params}, run_revise)
    ref = StageRef.of_stage(stage, explanations.layer)
    if not stage.done:
        stage.table(pipeline.rows_to_table(table, "explanations"), ref.path.name, "explanations")
        stage.seal({"explanations": explanations.directory}, params)
    return ref


def run_simulate(records_dir, explanations: StageRef, out, simulator=None, sim=None, seed: int = 0,
                 progress: Progress | None = None) -> StageRef:
    with collector.paused():
        return _simulate(records_dir, explanations, out, simulator, sim, seed, progress)


def _simulate(records_dir, explanations: StageRef, out, simulator, sim, seed: int, progress: Progress | None):
    records_dir = Path(records_dir)
    sim = sim or make_simulator(simulator)
    layer = explanations.layer
    _, _, records_key = _records_inputs(records_dir, layer)
    require_recording(explanations.directory, records_dir)  # its key names the explanations, not the records
    params = {"layer": layer, "simulator": sim.name, "prompt": sim.prompt_hash, "seed": seed,
              **_weights(sim.llm.fingerprint if sim.llm is not None else "")}
    keyed = {**params, "simulator": key_name(sim)}  # the manifest keeps the name as written
    code = code_identity(run_simulate)
    stage = Stage.open(out, "simulations", {"explanations": explanations.key, **keyed}, run_simulate)
    ref = StageRef.of_stage(stage, layer)
    if stage.done:
        return ref
    table = pq.read_table(explanations.path)
    units = _without_records(records_dir, layer, zip(*(table.column(c).to_pylist() for c in ("unit", "polarity"))))
    memo = Memo(out, "simulate", _scope(records_key, layer))
    sim_id = {"simulator": keyed["simulator"], "code": code, **_weights(params.get("weights", ""))}
    llm_cache.attach(sim, out)
    use_word_table(records_dir, out, sim)
    use_text_vectors(table, out, sim)
    # A unit is keyed by what of the prompt its texts' simulations depend on, not by the prompt's
    # hash: after an edit, the units it cannot change are read back. "" is the text of a failed
    # explanation and of the control that borrows it (neither is simulated).
    texts = sorted(set(explanation_texts(table)) | {""})
    depends = dict(zip(texts, sim.prompt_dependence(texts)))

    def key(unit, inputs) -> str:
        prompt = [depends[t] for t in _texts_of(inputs)] + [depends[""]]
        return _unit_key(records_key, unit, **inputs, **sim_id, prompt=prompt)

    held: dict[str, tuple | None] = {}  # what `known` found, so that `remember` does not look it up again

    def known(unit, inputs) -> bool:
        held[k] = memo.get(k := key(unit, inputs), columnar=True)
        return held[k] is not None

    def remember(unit, inputs, compute):  # a result is a (chosen, simulations) pair: never falsy
        k = key(unit, inputs)
        return _stamped(held.pop(k, None) or memo.get_or_compute(k, compute, _no_request_failed, True), params["prompt"])
    # Only the units the memo does not hold are read and warmed: after an edit, a few in a shard.
    chosen, sims = pipeline.simulate_stage(units, table, sim, seed, remember, progress, known=known,
                                           load=lambda some: _with_records(records_dir, layer, some))
    stage.table(sims, ref.path.name, "simulations")
    # the chosen rows are the explanations' own, whose failures the manifest inherits with its input
    stage.table(chosen, layout.CHOSEN, "explanations", counted=False)
    stage.seal({"records": records_dir, "explanations": explanations.directory}, params,
               memo, [layout.CHOSEN, ref.path.name])  # a result is (chosen rows, simulation rows)
    return ref


def run_score(records_dir, simulations: StageRef, out, n_boot: int = 1000, seed: int = 0) -> StageRef:
    with collector.paused():
        return _score(records_dir, simulations, out, n_boot, seed)


def _score(records_dir, simulations: StageRef, out, n_boot: int, seed: int) -> StageRef:
    layer = simulations.layer
    params = {"layer": layer, "n_boot": n_boot, "seed": seed}
    code = code_identity(run_score)
    _, _, records_key = _records_inputs(Path(records_dir), layer)
    require_recording(simulations.directory, records_dir)  # its key names the simulations, not the records
    stage = Stage.open(out, "scores", {"simulations": simulations.key, **params}, run_score)
    ref = StageRef.of_stage(stage, layer)
    if stage.done:
        return ref
    sims = pq.read_table(simulations.path)
    chosen = pq.read_table(simulations.directory / layout.CHOSEN)
    sims_of, chosen_of = _by_unit(table_rows(sims)), _by_unit(chosen.to_pylist())
    memo, rows = Memo(out, "score", _scope(records_key, layer)), []
    keys = {u.id: _unit_key(records_key, u, sims=_sims_digest(sims_of[_pair(u)]), chosen=chosen_of.get(_pair(u), []),
                            n_boot=n_boot, seed=seed, code=code) for u in _without_records(records_dir, layer, sims_of)}
    found = {u: memo.get(k) for u, k in keys.items()}  # in `load_units`'s order, as the rows go
    todo = _with_records(records_dir, layer, [UnitRecords(u, []) for u, got in found.items() if got is None])
    for unit in todo:  # a unit without records (none read back) has no scores, as before
        found[unit.id] = pipeline.score_rows([unit], sims_of[_pair(unit)], chosen_of.get(_pair(unit), []), n_boot, seed)
        memo.put(keys[unit.id], found[unit.id])
    for got in found.values():
        rows += got or []
    stage.table(pipeline.rows_to_table(rows, "scores"), ref.path.name, "scores")
    stage.seal({"simulations": simulations.directory}, params, memo)
    return ref


def run_score_counted(*args, **kwargs) -> tuple[StageRef, dict[str, int]]:
    """`run_score` and the call counts it added: for a run in another process, whose counts the
    caller adds to its own."""
    from autoexplain.counters import since, snapshot

    before = snapshot()
    return run_score(*args, **kwargs), since(before)


def _sims_digest(rows: list[dict]) -> str:
    """A unit's simulation rows, hashed: expected values by their float64 bytes (JSON of thousands
    of floats per unit cost more than the scoring), the rest by one repr of them all."""
    # Not the prompt's hash: a score reads the expected values, and a unit's rows read back after a
    # prompt edit that could not change them (`_stamped`) differ from before in that column alone.
    names = sorted(set().union(*rows) - {"expected", "prompt_hash"})
    fields = itemgetter(*names, "expected")
    h = hashlib.sha256(repr([names, [(*rest, None if e is None else len(e)) for *rest, e in map(fields, rows)]]).encode())
    for r in rows:
        if r["expected"] is not None:
            h.update(np.asarray(r["expected"], dtype=np.float64).tobytes())
    return h.hexdigest()


def _pair(unit: UnitRecords) -> tuple[int, int]:
    return unit.id.index, unit.id.polarity


def _in_load_order(pair: tuple[int, int]) -> tuple[int, int]:
    return pair[0], -pair[1]  # `load_units`: by unit, +1 before -1


def _without_records(records_dir, layer: int, pairs) -> list[UnitRecords]:
    """The units (unit, polarity) `pairs` name, in `load_units`'s order, with no records read."""
    kind = source_kind(records_dir)
    return [UnitRecords(UnitId(f"L{layer}/{kind}", i, p), []) for i, p in sorted(set(pairs), key=_in_load_order)]


def _with_records(records_dir, layer: int, units: list[UnitRecords]) -> list[UnitRecords]:
    """These units read with their records (those that have any), in `load_units`'s order."""
    wanted = {u.id for u in units}
    found = [u for u in load_units(records_dir, layer, sorted({u.id.index for u in units})) if u.id in wanted] if units else []
    COUNTS["units_read"] += len(found)
    return found


def _by_unit(rows: list[dict]) -> dict[tuple[int, int], list[dict]]:
    grouped: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["unit"], row["polarity"]), []).append(row)
    return grouped


# For the stages defined in other modules (`classify_stage`, `negatives`): the same inputs and unit
# keys as these stages.
records_inputs, unit_key, memo_scope = _records_inputs, _unit_key, _scope
