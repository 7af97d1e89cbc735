"""Export and import in the layout of OpenAI's published neuron dataset.

Per layer and neuron, two files:
- `neurons/<layer>/<neuron>.json`: the activation records (`most_positive_activation_records`,
  `random_sample`, `random_sample_by_quantile`) and the summary statistics;
- `explanations/<layer>/<neuron>.jsonl`: one line holding the neuron id and its scored explanations,
  each with its per-record simulations (tokens, expected activations, true activations).
Negative-polarity units have no place in that layout; they are written as `<neuron>-neg.*` with
`"polarity": -1` in the neuron id, and read back the same way.

`import_explanations` turns such a folder (ours or the published one) into an explanations table,
so that published explanations can be re-simulated and re-scored with our simulators.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from autoexplain import files
from autoexplain.errors import UserError
from autoexplain.records import UnitRecords
from autoexplain.storage import write_json
from autoexplain.schemas import load_schema


def _stem(unit: int, polarity: int) -> str:
    return f"{unit}" if polarity > 0 else f"{unit}-neg"


def _neuron_id(layer: int, unit: int, polarity: int) -> dict:
    nid = {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": unit}
    if polarity < 0:
        nid["polarity"] = -1
    return nid


def _record(r) -> dict:
    return {"dataclass_name": "ActivationRecord", "tokens": list(r.tokens), "activations": list(r.activations)}


def export_unit(folder: Path, unit: UnitRecords, explanations: list[dict], simulations: dict, scores: dict) -> None:
    """explanations: rows of the explanations table for this unit; simulations: method -> {window_id: row};
    scores: method -> {metric: value}."""
    n = unit.id
    by_bin: dict[int, list] = {}
    for r in unit.records:
        if r.kind == "quantile":
            by_bin.setdefault(r.quantile_bin or 0, []).append(_record(r))
    stats = unit.stats
    neuron = {
        "dataclass_name": "NeuronRecord",
        "neuron_id": _neuron_id(n.layer, n.index, n.polarity),
        "most_positive_activation_records": [_record(r) for r in unit.select(kind="top")],
        "random_sample": [_record(r) for r in unit.select(kind="random")],
        "random_sample_by_quantile": [by_bin[b] for b in sorted(by_bin)],
        "mean": stats.mean if stats else None,
        "variance": stats.std**2 if stats else None,
        "skewness": stats.skewness if stats else None,
        "kurtosis": stats.kurtosis if stats else None,
    }
    write_json(neuron, folder / "neurons" / str(n.layer) / f"{_stem(n.index, n.polarity)}.json")

    records_by_window = {r.window_id: r for r in unit.records}
    scored = []
    for row in explanations:
        sims = simulations.get(row["method"], {})
        sequences = []
        for wid, sim in sims.items():
            rec = records_by_window.get(wid)
            if rec is None:
                continue
            sequences.append({
                "dataclass_name": "ScoredSequenceSimulation",
                "simulation": {"dataclass_name": "SequenceSimulation", "tokens": list(rec.tokens),
                               "expected_activations": sim["expected"]},
                "true_activations": list(rec.activations),
                "split": sim["split"], "kind": sim["kind"], "failure": sim["failure"],
            })
        metrics = scores.get(row["method"], {})
        scored.append({
            "dataclass_name": "ScoredExplanation",
            "explanation": row["text"],
            "method": row["method"],
            "explainer": row["explainer"],
            "scored_simulation": {
                "dataclass_name": "ScoredSimulation",
                "scored_sequence_simulations": sequences,
                "ev_correlation_score": metrics.get("top_and_random"),
                "rsquared_score": metrics.get("calibrated_r2"),
                "absolute_dev_explained_score": metrics.get("calibrated_abs_dev_explained"),
            },
        })
    line = {"neuron_id": _neuron_id(n.layer, n.index, n.polarity), "scored_explanations": scored}
    path = folder / "explanations" / str(n.layer) / f"{_stem(n.index, n.polarity)}.jsonl"
    write_json_line(line, path)


def write_json_line(obj: dict, path: Path) -> None:
    files.write_text(path, json.dumps(obj) + "\n")


def export_layer(folder: str | Path, units: list[UnitRecords], chosen: pa.Table, simulations: pa.Table,
                 scores: pa.Table) -> int:
    folder = Path(folder)
    chosen_df, sims_df, scores_df = pl.from_arrow(chosen), pl.from_arrow(simulations), pl.from_arrow(scores)
    for unit in units:
        key = (pl.col("unit") == unit.id.index) & (pl.col("polarity") == unit.id.polarity)
        exps = chosen_df.filter(key).to_dicts()
        sims: dict[str, dict] = {}
        for row in sims_df.filter(key).to_dicts():
            sims.setdefault(row["method"], {})[row["window_id"]] = row
        metric_values: dict[str, dict] = {}
        for row in scores_df.filter(key).to_dicts():
            metric_values.setdefault(row["method"], {})[row["metric"]] = row["value"]
        export_unit(folder, unit, exps, sims, metric_values)
    return len(units)


def _from_dataset(folder: Path, layer: int | None, kind: str | None = None) -> pa.Table:
    """The explainer's rows of a dataset `publish` wrote (`data/explanations/<source>/layer_<L>.parquet`,
    of one source `kind` or all), as an explanations table: its candidates kept, its costs not (they
    were paid by its run; the importing run spends nothing on them, so its cost line says $0, not
    "unknown")."""
    parts = sorted((folder / "data" / "explanations").glob(f"{kind or '*'}/layer_{'*' if layer is None else layer}.parquet"))
    if not parts:
        raise UserError(f"{folder} is a published dataset without explanations of layer {layer}",
                        "pass a layer it has (data/explanations/<source>/layer_<L>.parquet)")
    table = pa.concat_tables([pq.read_table(f) for f in parts], promote_options="default")
    rows = [{**{k: r[k] for k in ("layer", "unit", "polarity", "method", "prompt_hash", "text", "candidates")},
             "explainer": f"imported:{r['explainer']}", "candidate_valid_scores": [], "prompt_tokens": 0,
             "completion_tokens": 0, "dollars": 0.0, "selection_tokens": 0, "selection_dollars": 0.0}
            for r in table.to_pylist() if r["method"] == "explainer" and (r["text"] or "").strip()]
    return pa.Table.from_pylist(rows, schema=load_schema("explanations"))


def import_explanations(folder: str | Path, layer: int | None = None, kind: str | None = None) -> pa.Table:
    """Every explanation under `<folder>/explanations/<layer>/*.jsonl` (the reference layout), or in a
    dataset that `autoexplain publish` wrote (of source `kind`, or all), as an explanations table."""
    if (Path(folder) / "data" / "explanations").is_dir():
        return _from_dataset(Path(folder), layer, kind)
    root = Path(folder) / "explanations"
    pattern = f"{layer}/*.jsonl" if layer is not None else "*/*.jsonl"
    files = sorted(root.glob(pattern))
    if not files:
        raise UserError(f"no explanation files match {root}/{pattern}", "point at a folder with explanations/<layer>/<neuron>.jsonl")
    rows, seen = [], set()
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                nid = obj["neuron_id"]
                key = (nid["layer_index"], nid["neuron_index"], nid.get("polarity", 1))
                # Our exports also hold the baselines; the published dataset has no "method" field.
                texts = [e["explanation"] for e in obj["scored_explanations"]
                         if e.get("explanation", "").strip() and e.get("method", "explainer") in ("explainer", "llm")]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{n} is not a neuron explanation record ({type(e).__name__}: {e})",
                                "expect {'neuron_id': {...}, 'scored_explanations': [{'explanation': ...}]}") from None
            if not texts or key in seen:
                continue
            seen.add(key)
            rows.append({"layer": key[0], "unit": key[1], "polarity": key[2], "method": "explainer", "explainer": "imported",
                         "prompt_hash": "", "text": texts[0], "candidates": texts, "candidate_valid_scores": [],
                         "prompt_tokens": 0, "completion_tokens": 0,
                         "dollars": 0.0, "selection_tokens": 0, "selection_dollars": 0.0})
    return pa.Table.from_pylist(rows, schema=load_schema("explanations"))
