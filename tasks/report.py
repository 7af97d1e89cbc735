"""Lineage and reports: each output published as a Prefect asset, plus the run's artifacts.

`publish` is a materialising task whose asset key is the output's URI and whose upstream assets
are its inputs' URIs, so the Prefect UI draws the lineage graph. `report_task` writes a lineage
table, a score summary table and a markdown report with the layer's score histogram. Under a URL
output root, the URIs are the folders' URLs and the folders are pulled here before they are read.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.assets import materialize

from autoexplain import remote
from autoexplain.storage import read_manifest
from tasks.stages import local_ref

HEADLINE = "top_and_random"


@materialize("file:///autoexplain/placeholder", name="publish")
def _publish(output: dict) -> dict:
    return {"uri": output["uri"], "key": output["key"]}


def publish(output: dict, upstream: list[dict]):
    """Record `output` as an asset materialised from `upstream` (both are task references)."""
    return _publish.with_options(assets=[output["uri"]], asset_deps=[u["uri"] for u in upstream])(output)


def _histogram(values: list[float], bins: int = 10, width: int = 40) -> str:
    if not values:
        return "(no defined scores)"
    lo, hi = -1.0, 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    top = max(counts)
    lines = []
    for i, c in enumerate(counts):
        a = lo + (hi - lo) * i / bins
        lines.append(f"{a:+.1f} .. {a + (hi - lo) / bins:+.1f} | {'#' * round(width * c / top):<{width}} {c}")
    return "\n".join(lines)


def _viewer_inputs(scores: list[dict], records: dict | None) -> list[dict]:
    """The scores here, with the simulations and records that the viewer follows them to."""
    scores = [local_ref(s) for s in scores]
    if records is not None:
        local_ref(records)
    for s in scores:
        folder = Path(s["path"]).parent
        if s["uri"] != folder.resolve().as_uri():  # a URL root: what a manifest names may not be here yet
            sims = Path(read_manifest(folder)["inputs"]["simulations"]).name
            remote.fetch(f"{s['uri'].rsplit('/', 2)[0]}/simulations/{sims}")
    return scores


@task(name="view", persist_result=False)
def view_task(scores: list[dict], site_dir: str, records: dict | None = None) -> str:
    """Write the static neuron viewer for the scored shards; returns its index page's URI. `site_dir`
    may be a URL: the site is built in its local mirror, then uploaded."""
    from autoexplain.view import build_site

    scores = _viewer_inputs(scores, records)
    site = remote.open_root(site_dir)
    index = build_site([Path(s["path"]).parent for s in scores], site)
    remote.push(site)  # nothing to do for a local folder
    return remote.uri(index)


@task(name="report", persist_result=False)
def report_task(records: dict, stages: list[dict], scores: list[dict], site: str | None = None) -> dict:
    """stages: every output reference of the run (records, explanations, simulations, scores)."""
    records, stages, scores = local_ref(records), [local_ref(s) for s in stages], [local_ref(s) for s in scores]
    table = pl.concat([pl.read_parquet(s["path"]) for s in scores]) if scores else pl.DataFrame()
    lineage = []
    for s in [records, *stages]:
        manifest = read_manifest(s["path"] if s is records else Path(s["path"]).parent)
        lineage.append({"output": s["uri"], "content_hash": s["key"], "stage": manifest["stage"],
                        "inputs": ", ".join(f"{k}={v}" for k, v in manifest["inputs"].items())})
    create_table_artifact(lineage, key="lineage", description="Every output of this run: URI, content hash, inputs")

    summary = []
    if table.height:
        grouped = (table.group_by("method", "metric")
                   .agg(pl.len().alias("units"), pl.col("value").mean().alias("mean"),
                        pl.col("value").std().alias("std"), pl.col("value").null_count().alias("undefined"))
                   .sort("metric", "method"))
        for row in grouped.iter_rows(named=True):
            n = row["units"] - row["undefined"]
            half = 1.96 * (row["std"] or 0.0) / max(n, 1) ** 0.5
            summary.append({"method": row["method"], "metric": row["metric"], "units": row["units"],
                            "undefined": row["undefined"],
                            "mean": None if row["mean"] is None else round(row["mean"], 4),
                            "ci95": None if row["mean"] is None else f"[{row['mean'] - half:.3f}, {row['mean'] + half:.3f}]"})
    create_table_artifact(summary, key="score-summary", description="Mean test-split scores by method, 95% CI of the mean")

    headline = [] if not table.height else (
        table.filter((pl.col("metric") == HEADLINE) & (pl.col("method") == "explainer"))["value"].drop_nulls().to_list())
    links = "\n".join(f"- {s['uri']}" for s in scores)
    md = (f"# Layer report\n\nUnits scored: {len(headline)} (defined explainer {HEADLINE} scores)\n\n"
          f"## Score histogram (explanation, {HEADLINE}, test split)\n\n```\n{_histogram(headline)}\n```\n\n"
          f"## Outputs\n\n- records: {records['uri']}\n{links}\n")
    create_markdown_artifact(md, key="layer-report", description="Score histogram and links to the outputs")
    if site:
        create_link_artifact(site, link_text="neuron viewer", key="viewer")
    return {"units": len(headline), "summary": summary}
