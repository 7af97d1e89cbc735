"""What a user reads at the end of a run: a layer's scores in one table, and how a re-score moved them.

`layer_summary` pools the score shards of one layer: per method and metric, the mean over units with
a 95 % CI of that mean, and the share of units whose score beats the token-lookup baseline on the
same metric (the paper's bar: an explanation should say more than the unit's top tokens).
`compare` pairs two scorings of the same units (yesterday's and tonight's) on the headline metric.
"""

from __future__ import annotations

import math

import polars as pl

from autoexplain import prices
from autoexplain.pipeline import EXPLAINER, LOOKUP
from autoexplain.scoring import TOP_AND_RANDOM, mean_ci

HEADLINE = TOP_AND_RANDOM
_UNIT = ["layer", "unit", "polarity"]


def layer_summary(scores: pl.DataFrame) -> pl.DataFrame:
    """One row per (method, metric): units, undefined, mean, ci_low, ci_high, beats_lookup (share
    of the units with both scores defined; null for the baseline itself)."""
    lookup = (scores.filter(pl.col("method") == LOOKUP)
              .select(*_UNIT, "metric", pl.col("value").alias("lookup")))
    joined = scores.join(lookup, on=[*_UNIT, "metric"], how="left")
    grouped = (joined.group_by("method", "metric")
               .agg(pl.len().alias("units"), pl.col("value").null_count().alias("undefined"),
                    pl.col("value").alias("values"),
                    (pl.col("value") > pl.col("lookup")).filter(pl.col("value").is_not_null()
                                                                & pl.col("lookup").is_not_null()).mean()
                    .alias("beats_lookup"))
               .sort("metric", "method"))
    rows = []
    for r in grouped.iter_rows(named=True):
        mean, lo, hi = mean_ci(r["values"])
        rows.append({"method": r["method"], "metric": r["metric"], "units": r["units"], "undefined": r["undefined"],
                     "mean": mean, "ci_low": lo, "ci_high": hi,
                     "beats_lookup": None if r["method"] == LOOKUP else r["beats_lookup"]})
    return pl.DataFrame(rows, schema={"method": pl.String, "metric": pl.String, "units": pl.Int64,
                                      "undefined": pl.Int64, "mean": pl.Float64, "ci_low": pl.Float64,
                                      "ci_high": pl.Float64, "beats_lookup": pl.Float64})


def unit_costs(scores: pl.DataFrame) -> pl.DataFrame:
    """Per unit (layer, unit, polarity): `dollars`, what its explanation, selection, simulations
    and baselines cost together, or null when a model it used has no price."""
    per = scores.unique([*_UNIT, "method", "simulator"], keep="first").sort([*_UNIT, "method", "simulator"])
    return (per.group_by(_UNIT).agg(pl.col("dollars").sum(), pl.col("dollars").null_count().alias("unknown"))
            .select(*_UNIT, pl.when(pl.col("unknown") == 0).then(pl.col("dollars")).alias("dollars")).sort(_UNIT))


def run_cost(scores: pl.DataFrame) -> dict:
    """What the scored units cost (`dollars` of the scores table, once per unit, method and
    simulator; the table repeats it on every metric's row): the total over the units whose cost is
    known, per unit, and how many units have no known price."""
    if "dollars" not in scores.columns or not scores.height:
        return {"dollars": None, "units": 0, "unknown": 0, "per_unit": None}
    per_unit = unit_costs(scores)
    known = per_unit.filter(pl.col("dollars").is_not_null())
    total = float(known["dollars"].sum()) if known.height else None
    return {"dollars": total, "units": per_unit.height, "unknown": per_unit.height - known.height,
            "per_unit": total / known.height if known.height else None}


def cost_line(cost: dict) -> str:
    """One line for the console and the report: what the scores shown cost to make, whichever run
    paid for them (what this run paid is on the `LLM:` line: a rerun reuses what it can)."""
    if not cost["units"]:
        return "cost: nothing scored"
    line = (f"cost of these scores: ${cost['dollars']:.4f} for {cost['units'] - cost['unknown']} units "
            f"(${cost['per_unit']:.6f} per unit) at the prices of {prices.source()}" if cost["dollars"] is not None
            else "cost of these scores: unknown")
    if cost["unknown"]:
        line += (f"; {cost['unknown']} units used a model with no known price (add it to autoexplain/prices.json "
                 "or a file named by $AUTOEXPLAIN_PRICES)")
    return line


def dead_line(asked: int, dead: list[int], most: int = 10) -> str:
    """What a run says of its units that never fired: '17 asked, 2 never fired (25, 39)', the ids
    when few (the first `most` and how many more otherwise)."""
    if not dead:
        return f"{asked:,} asked, all fired"
    ids = ", ".join(map(str, dead[:most])) + (f" and {len(dead) - most:,} more" if len(dead) > most else "")
    return f"{asked:,} asked, {len(dead):,} never fired ({ids})"


def compare(before: pl.DataFrame, after: pl.DataFrame, metric: str = HEADLINE, method: str = EXPLAINER,
            top: int = 10) -> dict:
    """The headline score of each unit before and after: mean change with a 95 % CI over the units
    scored both times, and the units that moved most."""
    def pick(df: pl.DataFrame, name: str) -> pl.DataFrame:
        return (df.filter((pl.col("metric") == metric) & (pl.col("method") == method))
                .select(*_UNIT, pl.col("value").alias(name)))

    pairs = pick(before, "before").join(pick(after, "after"), on=_UNIT, how="full", coalesce=True)
    both = pairs.drop_nulls(["before", "after"]).with_columns((pl.col("after") - pl.col("before")).alias("change"))
    n = both.height
    mean, lo, hi = mean_ci(both["change"].to_list())
    moved = (both.filter(pl.col("change") != 0)  # a list of unchanged units would read as movement
             .sort(pl.col("change").abs(), *_UNIT, descending=[True, False, False, False]).head(top))
    return {"metric": metric, "method": method, "units": pairs.height, "paired": n,
            "mean_before": both["before"].mean() if n else None, "mean_after": both["after"].mean() if n else None,
            "mean_change": mean, "ci_low": lo, "ci_high": hi,
            "lost": pairs.filter(pl.col("before").is_not_null() & pl.col("after").is_null()).height,
            "gained": pairs.filter(pl.col("before").is_null() & pl.col("after").is_not_null()).height,
            "moved": moved.to_dicts()}


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def compare_markdown(c: dict, title: str) -> str:
    lines = [f"# {title}", "",
             f"Headline: `{c['metric']}` of the `{c['method']}` explanation, test split. "
             f"{c['paired']} of {c['units']} units scored both times"
             f" ({c['lost']} lost a defined score, {c['gained']} gained one).", "",
             f"- mean before: {_f(c['mean_before'])}", f"- mean after: {_f(c['mean_after'])}",
             f"- **mean change: {_f(c['mean_change'])}** (95% CI [{_f(c['ci_low'])}, {_f(c['ci_high'])}])", "",
             "## Units that moved most", ""]
    if not c["moved"]:
        return "\n".join(lines + ["No unit's score changed."]) + "\n"
    lines += ["| layer | unit | polarity | before | after | change |", "|---|---|---|---|---|---|"]
    lines += [f"| {m['layer']} | {m['unit']} | {m['polarity']:+d} | {_f(m['before'])} | {_f(m['after'])} | {_f(m['change'])} |"
              for m in c["moved"]]
    return "\n".join(lines) + "\n"
