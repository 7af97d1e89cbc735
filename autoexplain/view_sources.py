"""The viewer's inputs: a layer's scores, chosen explanations, simulations and records, found by
following each scores folder's manifest to its simulations folder and on to its records folder.

`find_sources` gathers the shards of one layer into one `LayerSource`; the readers here return
polars frames (or records) for `autoexplain.view_data` to turn into the site's data files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import polars as pl

from autoexplain import layout
from autoexplain.errors import UserError
from autoexplain.storage import is_complete, read_manifest, require_complete, require_recording


@dataclass
class LayerSource:
    """Where one layer's tables live, found by following the manifests. A layer explained in shards
    of units has one scores folder (and simulations folder) per shard, all from one recording."""

    layer: int
    scores_dirs: list[Path]
    simulations_dirs: list[Path]
    records_dir: Path | None
    simulator: str
    source: str = ""  # the units' source, 'L<layer>/<kind>' (`records.UnitId.source`); '' reads as the MLP's

    def __post_init__(self):
        self.source = self.source or f"L{self.layer}/mlp"


@dataclass
class NeverFired:
    """A run's units of one source that never fired (`source` as in `LayerSource`), and the recording
    that says so: a source whose asked units all never fired has no scores, and is shown by this alone."""

    source: str
    units: list[int]
    records_dir: Path | None

    @property
    def layer(self) -> int:
        return int(_SOURCE.fullmatch(self.source).group(1))


def unscored(never: NeverFired) -> LayerSource:
    """The layer source of units that all never fired: no scores, no simulations, its recording."""
    return LayerSource(never.layer, [], [], never.records_dir, "", never.source)


def _resolve(ref: str | None, near: Path, stage: str) -> Path | None:
    """The folder a manifest names as an input (`layout.input_of`), or None when it is not here. One
    that is here but sealed and broken (a changed file, a table that breaks its contract) stops the
    build, naming the file."""
    if not ref:
        return None
    folder = layout.input_of(near, ref)
    if is_complete(folder):
        return folder
    if (folder / layout.MANIFEST).is_file():
        require_complete(folder, stage, f"rerun the {stage} stage that wrote it")
    return None


def source_of(scores_dir: Path, layer: int) -> str:
    """The unit source of a scores folder: its table's `source` column (written by runs on other
    sources than the MLP, e.g. 'L15/sae-res-16k'), else the layer's MLP, as tables without one are."""
    import pyarrow.parquet as pq

    path = layout.table(scores_dir, layer)
    if "source" not in pq.read_schema(path).names:
        return f"L{layer}/mlp"
    found = set(pl.read_parquet(path, columns=["source"])["source"].drop_nulls().unique().to_list())
    named = {s if _SOURCE.fullmatch(s) else f"L{layer}/{s}" for s in found} or {f"L{layer}/mlp"}
    if len(named) > 1 or int(_SOURCE.fullmatch(next(iter(named))).group(1)) != layer:
        raise UserError(f"{scores_dir} holds units of sources {sorted(named)}, but one folder is one source of layer {layer}",
                        "rerun the score stage for that source")
    return next(iter(named))


_SOURCE = re.compile(r"L(\d+)/([A-Za-z0-9][A-Za-z0-9_-]*)")


def find_sources(score_dirs: Iterable[str | Path], records_dir: str | Path | None = None) -> list[LayerSource]:
    sources: dict[str, LayerSource] = {}
    for d in score_dirs:
        d = require_complete(d, "scores", "pass folders printed by `autoexplain score`")
        m = read_manifest(d)
        if m.get("stage") != "scores":
            raise UserError(f"{d} is a {m.get('stage')} folder, not a scores folder",
                            "pass folders printed by `autoexplain score`")
        layer = int(m["params"]["layer"])
        sims = _resolve(m.get("inputs", {}).get("simulations"), d, "simulations")
        simulator, recs = "", None
        if sims is not None:
            sm = read_manifest(sims)
            simulator = str(sm.get("params", {}).get("simulator", ""))
            recs = _resolve(sm.get("inputs", {}).get("records"), sims, "records")
        if records_dir is not None:
            recs = require_complete(records_dir, "records", "pass the folder printed by `autoexplain record`")
            require_recording(d, recs)
        if recs is not None and layer not in read_manifest(recs).get("params", {}).get("layers", []):
            if records_dir is not None:
                raise UserError(f"layer {layer} was not recorded in {recs}", "pass the records folder of that run")
            recs = None
        name = source_of(d, layer)
        src = sources.get(name)
        if src is None:
            sources[name] = LayerSource(layer, [d], [sims] if sims else [], recs, simulator, name)
            continue
        # Another shard of a layer already seen: a different folder, from the same recording and
        # simulator (the layer page states one of each).
        if d.resolve() in {x.resolve() for x in src.scores_dirs}:
            raise UserError(f"layer {layer} comes twice ({d})",
                            "build one site per run: one scores folder per layer, or the shards of one run")
        # by key: the same recording may be reached by two paths (a copied root's pointers)
        if (recs and layout.key_of(recs), simulator) != (src.records_dir and layout.key_of(src.records_dir), src.simulator):
            raise UserError(f"the scores of layer {layer} in {src.scores_dirs[0]} and {d} come from different "
                            f"recordings or simulators", "build one site per run: pass the shards of one run")
        src.scores_dirs.append(d)
        src.simulations_dirs += [sims] if sims else []
    if not sources:
        raise UserError("no scores folders given", "pass at least one folder printed by `autoexplain score`")
    return sorted(sources.values(), key=lambda s: (s.layer, s.source != f"L{s.layer}/mlp", s.source))


def read_scores(src: LayerSource) -> pl.DataFrame:
    if not src.scores_dirs:  # every unit asked never fired (`unscored`)
        from autoexplain.rows import rows_to_table

        return pl.from_arrow(rows_to_table([], "scores"))
    df = pl.concat([pl.read_parquet(layout.table(d, src.layer)) for d in src.scores_dirs], how="diagonal_relaxed")
    if df.select("unit", "polarity", "method", "metric", *(["split"] if "split" in df.columns else [])).is_duplicated().any():
        raise UserError(f"the scores folders of layer {src.layer} overlap: some units are scored twice",
                        "pass the shards of one run, each unit in one of them")
    if "split" in df.columns and (df["split"] == "test").any():
        df = df.filter(pl.col("split") == "test")
    return df.with_columns(pl.col("value").fill_nan(None), pl.col("ci_low").fill_nan(None),
                           pl.col("ci_high").fill_nan(None))


def read_chosen(src: LayerSource) -> pl.DataFrame:
    paths = [d / layout.CHOSEN for d in src.simulations_dirs if (d / layout.CHOSEN).is_file()]
    if paths:
        return pl.concat([pl.read_parquet(p) for p in paths], how="diagonal_relaxed")
    return pl.DataFrame(schema={"unit": pl.Int32, "polarity": pl.Int8, "method": pl.Utf8, "explainer": pl.Utf8,
                                "text": pl.Utf8, "candidates": pl.List(pl.Utf8),
                                "candidate_valid_scores": pl.List(pl.Float64)})


def sims_frame(src: LayerSource) -> pl.DataFrame | None:
    """The test-split simulations of a layer (the ones its scores come from), or None: unit,
    polarity, method, window_id, expected (a list) and failure. `view_data.sims_of` turns the rows
    of the units a build writes into the page's JSON; `view_data.sims_digests` tells which changed."""
    paths = [layout.table(d, src.layer) for d in src.simulations_dirs]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        return None
    cols = ["unit", "polarity", "method", "window_id", "split", "expected", "failure"]
    sims = pl.concat([pl.scan_parquet(p).select(cols).filter(pl.col("split") == "test") for p in paths]).collect()
    return sims.select(pl.col("unit").cast(pl.Int64), pl.col("polarity").cast(pl.Int64), "method", "window_id",
                       "expected", "failure")


def records_reader(src: LayerSource):
    """A function (list of (unit, polarity)) -> {(unit, polarity): UnitRecords}, or None without records."""
    if src.records_dir is None:
        return None
    m = read_manifest(src.records_dir)
    windows = layout.sibling(src.records_dir, "windows", m["inputs"]["windows"]) / layout.WINDOWS
    records_path = layout.records_table(src.records_dir, src.layer)
    stats_path = layout.stats_table(src.records_dir, src.layer)
    if not windows.is_file() or not records_path.is_file():
        return None

    def read(keys):
        # Imported here: it brings torch, which a rebuild from the records cache never needs.
        from autoexplain.activations import read_stats, read_units
        from autoexplain.records import UnitId, UnitRecords

        found = read_units(records_path, windows, keys, stats_path if stats_path.is_file() else None)
        found = {(u.id.index, u.id.polarity): u for u in found}
        unrecorded = [k for k in keys if k not in found]  # never fired: statistics, no records
        if unrecorded and stats_path.is_file():
            stats = read_stats(stats_path, {u for u, _ in unrecorded})
            found.update({k: UnitRecords(UnitId(src.source, *k), [], stats[k]) for k in unrecorded if k in stats})
        return found

    return read
