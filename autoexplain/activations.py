"""Read recorded activations back as typed `UnitRecords`, joined with their windows' tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import polars as pl

from autoexplain.records import ActivationRecord, NeuronId, UnitRecords, UnitStats


def read_units(
    records_path: str | Path,
    windows_path: str | Path,
    units: Iterable[tuple[int, int]] | None = None,
    stats_path: str | Path | None = None,
) -> list[UnitRecords]:
    """All units of one layer's records file, or just `units` given as (unit, polarity) pairs."""
    recs = pl.scan_parquet(records_path)
    if units is not None:
        wanted = pl.DataFrame(list(units), schema={"unit": pl.Int32, "polarity": pl.Int8}, orient="row")
        recs = recs.join(wanted.lazy(), on=["unit", "polarity"], how="semi")
    recs = recs.collect()
    windows = (
        pl.scan_parquet(windows_path)
        .select("window_id", "tokens")
        .join(recs.lazy().select("window_id").unique(), on="window_id", how="semi")
        .collect()
    )
    tokens_of = dict(zip(windows["window_id"].to_list(), windows["tokens"].to_list()))
    stats_of = _read_stats(stats_path) if stats_path else {}

    out = []
    ordered = recs.sort(["unit", "polarity", "kind", "rank"], descending=[False, True, False, False])
    for (layer, unit, polarity), group in ordered.group_by(["layer", "unit", "polarity"], maintain_order=True):
        records = [
            ActivationRecord(tokens_of[w], list(a), window_id=w, kind=k, split=s, quantile_bin=q)
            for w, a, k, s, q in zip(group["window_id"], group["activations"], group["kind"], group["split"],
                                     group["quantile_bin"])
        ]
        neuron = NeuronId(int(layer), int(unit), int(polarity))
        out.append(UnitRecords(neuron, records, stats_of.get((int(unit), int(polarity)))))
    return out


def _read_stats(path: str | Path) -> dict[tuple[int, int], UnitStats]:
    table = pl.read_parquet(path)
    out = {}
    for row in table.iter_rows(named=True):
        out[(row["unit"], row["polarity"])] = UnitStats(
            mean=row["mean"], std=row["std"], max=row["max"], frac_active=row["frac_active"],
            skewness=row["skewness"], kurtosis=row["kurtosis"],
            hist_edges=row["hist_edges"], hist_counts=row["hist_counts"],
        )
    return out
