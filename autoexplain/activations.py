"""Read recorded activations back as typed `UnitRecords`, joined with their windows' tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import polars as pl

from autoexplain.output_side import OUTPUT_COLUMNS
from autoexplain.records import ActivationRecord, UnitId, UnitRecords, UnitStats


def read_units(
    records_path: str | Path,
    windows_path: str | Path,
    units: Iterable[tuple[int, int]] | None = None,
    stats_path: str | Path | None = None,
    kind: str = "mlp",
) -> list[UnitRecords]:
    """All units of one layer's records file, or just `units` given as (unit, polarity) pairs.
    `kind`: the unit source the file was recorded from (its units' `UnitId.source` is 'L<layer>/<kind>')."""
    recs = pl.scan_parquet(records_path)
    if units is not None:
        units = list(units)
        wanted = pl.DataFrame(units, schema={"unit": pl.Int32, "polarity": pl.Int8}, orient="row")
        # The filter first: it skips the row groups that hold none of them (a join reads them all).
        recs = recs.filter(pl.col("unit").is_in(sorted({u for u, _ in units})))
        recs = recs.join(wanted.lazy(), on=["unit", "polarity"], how="semi")
    recs = recs.collect()
    windows = (
        pl.scan_parquet(windows_path)
        .select("window_id", "tokens")
        .join(recs.lazy().select("window_id").unique(), on="window_id", how="semi")
        .collect()
    )
    tokens_of = dict(zip(windows["window_id"].to_list(), windows["tokens"].to_list()))
    stats_of = read_stats(stats_path, None if units is None else {u for u, _ in units}) if stats_path else {}

    if recs.height == 0:
        return []
    # A total order: ranks restart in each quantile bin, and ties would come out in whatever order
    # the join left them, which depends on which other units were read in the same call.
    ordered = recs.sort(["layer", "unit", "polarity", "kind", "quantile_bin", "rank", "window_id"],
                        descending=[False, False, True, False, False, False, False])
    # Whole columns as Python lists once, then sliced per unit: iterating polars Series element by
    # element cost more than the rest of scoring.
    cols = {c: ordered[c].to_list() for c in ("window_id", "activations", "kind", "split", "quantile_bin")}
    keys = ordered.select("layer", "unit", "polarity").to_numpy()
    bounds = np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1
    out = []
    for start, end in zip([0, *bounds], [*bounds, len(keys)]):
        records = [
            ActivationRecord(tokens_of[w], a, window_id=w, kind=k, split=s, quantile_bin=q)
            for w, a, k, s, q in zip(*(cols[c][start:end] for c in cols))
        ]
        layer, unit, polarity = (int(x) for x in keys[start])
        out.append(UnitRecords(UnitId(f"L{layer}/{kind}", unit, polarity), records, stats_of.get((unit, polarity))))
    return out


def read_stats(path: str | Path, units: set[int] | None = None) -> dict[tuple[int, int], UnitStats]:
    """A layer's statistics table by (unit, polarity), or those of `units` only: every unit recorded
    has them, also one that never fired and so has no records."""
    table = pl.read_parquet(path)
    if units is not None:
        table = table.filter(pl.col("unit").is_in(sorted(units)))
    out = {}
    for row in table.iter_rows(named=True):
        out[(row["unit"], row["polarity"])] = UnitStats(
            mean=row["mean"], std=row["std"], max=row["max"], frac_active=row["frac_active"],
            skewness=row["skewness"], kurtosis=row["kurtosis"],
            hist_edges=row["hist_edges"], hist_counts=row["hist_counts"],
            **{c: row.get(c) for c in OUTPUT_COLUMNS},
        )
    return out
