"""A whole model's result in one place: score by layer and source, against the baselines.

The paper's headline plot is the mean explanation score per layer; a reader of a model run also asks
how many units are explained well (the share above 0.8, the paper's bar for a good explanation),
how many never fired, and what it cost. `model_table` answers all of it from the score tables and
the counts of dead units; `markdown` is the Prefect artifact, `write_page` the site's report page.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from autoexplain.pipeline import EXPLAINER, METHODS
from autoexplain.summary import HEADLINE, layer_summary, run_cost

GOOD = 0.8  # the paper's bar for an explanation that captures the unit
PAGE = "report.html"


@dataclass
class PartScores:
    """One (source, layer) of a model run: its scores table and its units that never fired."""

    kind: str
    layer: int
    scores: pl.DataFrame
    dead: int


def model_table(parts: list[PartScores], metric: str = HEADLINE) -> pl.DataFrame:
    """One row per (source, layer, method) on `metric`: units scored, mean with its 95 % CI, the
    share of units above GOOD; and per (source, layer) the dead units and the cost in dollars."""
    rows = []
    for part in sorted(parts, key=lambda p: (p.kind != "mlp", p.kind, p.layer)):
        on = part.scores.filter(pl.col("metric") == metric) if part.scores.height else part.scores
        cost = run_cost(part.scores)["dollars"]
        means = {r["method"]: r for r in layer_summary(on).iter_rows(named=True)} if on.height else {}
        for method in METHODS:
            r = means.get(method)
            values = on.filter(pl.col("method") == method)["value"].drop_nulls() if on.height else pl.Series([], dtype=pl.Float64)
            rows.append({"source": part.kind, "layer": part.layer, "method": method,
                         "units": 0 if r is None else r["units"] - r["undefined"],
                         "mean": None if r is None else r["mean"], "ci_low": None if r is None else r["ci_low"],
                         "ci_high": None if r is None else r["ci_high"],
                         "above_good": float((values > GOOD).mean()) if len(values) else None,
                         "dead": part.dead, "dollars": cost})
    return pl.DataFrame(rows, schema={"source": pl.String, "layer": pl.Int64, "method": pl.String, "units": pl.Int64,
                                      "mean": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
                                      "above_good": pl.Float64, "dead": pl.Int64, "dollars": pl.Float64})


def totals(parts: list[PartScores], metric: str = HEADLINE) -> dict:
    """Over the whole run: units scored, the explanation's mean and share above GOOD, dead units, cost."""
    scores = pl.concat([p.scores for p in parts if p.scores.height], how="diagonal_relaxed") if any(
        p.scores.height for p in parts) else pl.DataFrame()
    mine = (scores.filter((pl.col("metric") == metric) & (pl.col("method") == EXPLAINER))["value"].drop_nulls()
            if scores.height else pl.Series([], dtype=pl.Float64))
    cost = run_cost(scores) if scores.height else run_cost(pl.DataFrame())
    return {"parts": len(parts), "layers": len({p.layer for p in parts}), "sources": sorted({p.kind for p in parts}),
            "units": len(mine), "mean": float(mine.mean()) if len(mine) else None,
            "above_good": float((mine > GOOD).mean()) if len(mine) else None,
            "dead": sum(p.dead for p in parts), "dollars": cost["dollars"], "metric": metric}


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def lines(table: pl.DataFrame) -> list[list[str]]:
    return [[r["source"], str(r["layer"]), r["method"], str(r["units"]), _num(r["mean"]),
             f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]", _pct(r["above_good"]), str(r["dead"]),
             "–" if r["dollars"] is None else f"${r['dollars']:.4f}"] for r in table.iter_rows(named=True)]


HEADER = ["source", "layer", "method", "units scored", "mean", "95 % CI", f"share > {GOOD}", "dead units", "cost"]


def headline(t: dict) -> str:
    cost = "unknown" if t["dollars"] is None else f"${t['dollars']:.4f}"
    return (f"{t['units']:,} units scored over {t['layers']} layers and {len(t['sources'])} source(s) "
            f"({', '.join(t['sources'])}): mean {t['metric']} {_num(t['mean'])}, {_pct(t['above_good'])} above {GOOD}; "
            f"{t['dead']:,} units never fired; cost {cost}.")


def markdown(table: pl.DataFrame, t: dict) -> str:
    text = ["# Model report", "", headline(t), "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    text += ["| " + " | ".join(cells) + " |" for cells in lines(table)]
    return "\n".join(text) + "\n"


def write_page(site_dir: Path, table: pl.DataFrame, t: dict, plots: list[tuple[str, str]]) -> Path:
    """The site's report page (`PAGE`): the headline, each plot and the table. Plain HTML that
    reads the viewer's stylesheet; every text from the run is escaped."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in lines(table))
    figures = "".join(f'<figure><img class="plot" src="{esc(src)}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption></figure>'
                      for src, title in plots)
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Model report</title><link rel="icon" href="data:,">'
            f'<link rel="stylesheet" href="assets/viewer.css"></head><body data-page="report"><main>'
            f'<nav class="crumbs"><a href="index.html">Overview</a> › Model report</nav><h1>Model report</h1>'
            f'<p class="lede" id="headline">{esc(headline(t))}</p><section class="plots">{figures}</section>'
            f'<section><h2>By source, layer and method</h2><table class="grid" id="model-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody></table></section></main></body></html>')
    path = Path(site_dir) / PAGE
    path.write_text(page, encoding="utf-8")
    return path
