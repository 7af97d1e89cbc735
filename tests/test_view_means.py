"""The site's layer means are `scoring.mean_ci`'s over the scores' own values (undefined ones left
out, counted once, by scoring): what the run's summary says, not a mean of the page's rounded copies."""

from __future__ import annotations

import json

import polars as pl

from autoexplain import pipeline
from autoexplain.scoring import mean_ci
from autoexplain.tables import write_table
from autoexplain.view import build_site
from autoexplain.view_data import BASELINES, METRICS
from tests.viewer_fixtures import reseal, synthetic_layer

# Values of five digits whose mean rounds to 4 digits otherwise than the mean of their 4-digit
# roundings does (0.3001 against 0.3000); two units undefined, one of them NaN.
CRAFTED = [0.10004, 0.20004, 0.30004, 0.40004, 0.50014, None, float("nan"), 0.30004, 0.30004, 0.30004]


def _summary(site) -> dict:
    text = (site / "data" / "L3" / "mlp" / "summary.js").read_text()
    return json.loads(text.split("]=", 1)[1].rstrip(";\n"))


def test_the_site_s_layer_means_are_scoring_s_over_the_scores_values(tmp_path):
    scores_dir = synthetic_layer(tmp_path / "out", 3, 5)  # 10 units
    path = scores_dir / "layer_3.parquet"
    scores = pl.read_parquet(path)
    mine = (pl.col("method") == pipeline.EXPLAINER) & (pl.col("metric") == "top_and_random")
    order = scores.filter(mine).select("unit", "polarity").with_columns(crafted=pl.Series(CRAFTED, dtype=pl.Float64))
    undefined = pl.col("crafted").is_null() | pl.col("crafted").is_nan()
    scores = (scores.join(order, on=["unit", "polarity"], how="left").with_columns(
        value=pl.when(mine).then(pl.col("crafted")).otherwise(pl.col("value")),
        ci_low=pl.when(mine).then(pl.when(undefined).then(None).otherwise(pl.col("crafted") - 0.1)).otherwise(pl.col("ci_low")),
        ci_high=pl.when(mine).then(pl.when(undefined).then(None).otherwise(pl.col("crafted") + 0.1)).otherwise(pl.col("ci_high")),
        undefined_reason=pl.when(mine & undefined).then(pl.lit("no spread")).otherwise(pl.col("undefined_reason")),
    ).drop("crafted"))
    write_table(scores.to_arrow(), path, "scores")
    reseal(scores_dir)
    defined = [v for v in CRAFTED if v is not None and v == v]
    shown = [round(v, 4) for v in defined]
    assert round(sum(defined) / len(defined), 4) != round(sum(shown) / len(shown), 4), "the values must tell them apart"

    build_site([scores_dir], tmp_path / "site", plots=False, meaning=False)
    means = _summary(tmp_path / "site")["means"]
    stored = pl.read_parquet(path)
    for metric in METRICS:
        for method in (pipeline.EXPLAINER, *BASELINES):
            values = stored.filter((pl.col("metric") == metric) & (pl.col("method") == method))["value"].to_list()
            m, lo, hi = mean_ci(values)
            n = sum(v is not None and v == v for v in values)
            expected = None if m is None else [round(m, 4), round(lo, 4), round(hi, 4), n]
            assert means[metric][method] == expected, (metric, method)
    assert means["top_and_random"][pipeline.EXPLAINER][3] == 8
