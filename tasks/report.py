"""Lineage and reports: each output published as a Prefect asset, plus the run's artifacts.

`publish` is a materialising task whose asset key is the output's URI and whose upstream assets
are its inputs' URIs; `publish_recording` does it for the windows and the records of a recording.
Prefect 3.9's open-source UI shows them in its Event Feed: each "Asset materialization succeeded"
event names the output (Resource) and its inputs (Related Resources), see docs/deploy.md.
`report_task` writes a lineage table, a score summary table, a markdown report with the layer's
score histogram, and the viewer artifact (how to serve the site over http: `autoexplain view
--serve`). Under a URL output root, the URIs are the folders' URLs and the folders are pulled here
before they are read.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from urllib.parse import unquote

import polars as pl
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.assets import Asset, AssetProperties, materialize
from prefect.types.names import MAX_ASSET_KEY_LENGTH, RESTRICTED_ASSET_CHARACTERS

from autoexplain import remote
from autoexplain.layer import dead_units
from autoexplain.storage import read_manifest
from autoexplain.summary import cost_line, run_cost
from autoexplain.tasks.stages import local_ref

HEADLINE = "top_and_random"


@materialize("file:///autoexplain/placeholder", name="publish")
def _publish(output: dict) -> None:
    # Returns None on purpose. Prefect links a task's inputs to earlier results by id(), also for
    # plain dicts that have since been freed (PrefectHQ/prefect#20558): a dict returned here and
    # dropped could lend its id to a later input and add this asset as a false upstream of another.
    return None


def asset(uri: str) -> str | Asset:
    """The Prefect asset of an output's URI: the URI itself where Prefect takes it as a key. It
    refuses spaces, '%' and a few other characters, and keys over 512 characters, so a folder named
    'my out' or 'café' (percent-encoded by `as_uri`) is the URI read back with each of those
    characters as '_' (too long: its end, after a hash of the whole), the true URI as its url."""
    if len(uri) <= MAX_ASSET_KEY_LENGTH and not any(c in uri for c in RESTRICTED_ASSET_CHARACTERS):
        return uri
    scheme, _, rest = unquote(uri).partition("://")
    rest = "".join("_" if c in RESTRICTED_ASSET_CHARACTERS else c for c in rest)
    room = MAX_ASSET_KEY_LENGTH - len(scheme) - 3
    if len(rest) > room:
        rest = hashlib.sha256(uri.encode()).hexdigest()[:16] + "/" + rest[-(room - 17):]
    return Asset(key=f"{scheme}://{rest}", properties=AssetProperties(url=uri))


def publish(output: dict, upstream: list[dict]):
    """Record `output` as an asset materialised from `upstream` (both are task references)."""
    return _publish.with_options(assets=[asset(output["uri"])], asset_deps=[asset(u["uri"]) for u in upstream])(output)


def windows_uri(records: dict) -> str:
    """The URI of the windows folder a records reference was recorded from: `<root>/windows/<key>`,
    the key named by the records manifest (a URL under a URL output root)."""
    records = local_ref(records)
    key = read_manifest(records["path"])["inputs"]["windows"]
    return f"{records['uri'].rsplit('/', 2)[0]}/windows/{key}"


def publish_recording(records: dict) -> dict:
    """Materialise the recording once per run: the windows asset (no upstream asset: the corpus and
    the tokenizer are not assets, their digests are in the windows manifest), then the records asset
    with the windows as its upstream. `records` is record_task's reference. Returns both URIs."""
    windows = windows_uri(records)
    _publish.with_options(assets=[asset(windows)])({"uri": windows, "key": windows.rsplit("/", 1)[1]})
    publish(records, [{"uri": windows}])
    return {"windows": windows, "records": records["uri"]}


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


def viewer_markdown(site: str) -> str:
    """The viewer artifact: where the site is, the command that serves it on loopback (a browser does
    not follow a file:// link from the Prefect UI) and, when `autoexplain view --serve` is serving
    that folder as this runs, its http link. `site`: the URI of the site's index.html."""
    from autoexplain.serve import DEFAULT_PORT, running_url

    if site.startswith("file://"):
        folder = remote.local_path(site).parent
        where = f"Site folder: `{folder}`"
    else:  # built in the URL's local mirror on the machine that ran view_task, then uploaded
        url = site.rsplit("/", 1)[0]
        folder = remote.open_root(url)
        where = f"Site: {url} (its local copy on the machine that built it: `{folder}`)"
    served = running_url(folder)
    now = (f"**Served now** by `autoexplain view --serve`: [{served}]({served})" if served else
           "No `autoexplain view --serve` was serving this folder when this report was written.")
    return (f"# Neuron viewer\n\n{where}\n\n"
            "Browsers do not open `file://` links from the Prefect UI. Serve the folder over http on the "
            "machine that holds it:\n\n"
            f"```bash\nautoexplain view --serve --site {shlex.quote(str(folder))}\n```\n\n"
            f"then open the address it prints (http://127.0.0.1:{DEFAULT_PORT}/ unless that port is taken); "
            "it serves until Ctrl-C.\n\n"
            f"{now}\n")


@task(name="view", persist_result=False)
def view_task(scores: list[dict], site_dir: str, records: dict | None = None, pages: list | None = None,
              never_fired: list[dict] | None = None) -> str:
    """Write the static neuron viewer for the scored shards; returns its index page's URI. `site_dir`
    may be a URL: the site is built in its local mirror, then uploaded. `pages`: (file, title) of
    pages written beside the site after it (the model report, the scorers' agreement), linked
    from its overview. `never_fired`: per layer and source of the run, the units asked for that
    never fired (`LayerWork.never_fired`); a source whose units all did is shown with them alone."""
    from autoexplain.view import BUILT_WHOLE, build_site
    from autoexplain.view_sources import NeverFired

    scores = _viewer_inputs(scores, records)
    site = remote.open_root(site_dir)
    never = [NeverFired(f"L{d['layer']}/{d['kind']}", list(d["units"]), Path(local_ref(d["records"])["path"]))
             for d in never_fired or ()]
    index = build_site([Path(s["path"]).parent for s in scores], site, pages=[tuple(p) for p in pages or ()],
                       never_fired=never)
    remote.push(site, prune=BUILT_WHOLE)  # nothing to do for a local folder
    return remote.uri(index)


@task(name="model-report", persist_result=False)
def model_report_task(parts: list[dict], site_dir: str | None) -> dict:
    """The model-level report: `parts`, one per (source, layer), with its `kind`, `layer`, `scores`
    (shard references) and `dead` (units that never fired). A markdown artifact, and the site's
    report page with the score-by-layer plot of each source when the site is a local folder."""
    from autoexplain import model_report
    from autoexplain.plots import plot_mean_by_layer

    loaded = [model_report.PartScores(p["kind"], p["layer"], pl.concat(
        [pl.read_parquet(local_ref(s)["path"]) for s in p["scores"]], how="diagonal_relaxed") if p["scores"] else pl.DataFrame(),
        p["dead"]) for p in parts]
    table, totals = model_report.model_table(loaded), model_report.totals(loaded)
    md = model_report.markdown(table, totals)
    create_markdown_artifact(md, key="model-report", description="Score by layer and source, share above 0.8, dead units, cost")
    if site_dir and not remote.is_url(site_dir):
        site, plots = Path(site_dir), []
        for kind in sorted({p.kind for p in loaded}):
            mine = [p.scores for p in loaded if p.kind == kind and p.scores.height]
            if mine:
                name = f"plots/mean_by_layer.{kind}.png"
                plot_mean_by_layer(pl.concat(mine, how="diagonal_relaxed"), site / name)
                plots.append((name, f"Mean score by layer, {kind} (95 % CI over units)"))
        model_report.write_page(site, table, totals, plots)
    return {"totals": totals, "markdown": md, "rows": table.to_dicts()}


@task(name="report", persist_result=False)
def report_task(records: dict, stages: list[dict], scores: list[dict], site: str | None = None,
                layer: int | None = None, dead: list[int] | None = None) -> dict:
    """stages: every output reference of the run (records, explanations, simulations, scores);
    `layer`: the one reported, of the recorded ones (default: the first); `dead`: the units the run
    was asked for that never fired (default: every dead unit of the recorded layer)."""
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
    cost = run_cost(table)
    layer = records["layers"][0] if layer is None else layer
    dead = dead_units(records["path"], layer) if dead is None else dead
    md = (f"# Layer report: layer {layer}\n\nUnits scored: {len(headline)} (defined explainer {HEADLINE} scores)\n\n"
          f"Dead units: {len(dead)} of the units asked for never fired in the recorded tokens and "
          f"were not explained{': ' + ', '.join(map(str, dead[:50])) + (' ...' if len(dead) > 50 else '') if dead else ''}\n\n"
          f"{cost_line(cost)}\n\n"
          f"## Score histogram (explanation, {HEADLINE}, test split)\n\n```\n{_histogram(headline)}\n```\n\n"
          f"## Outputs\n\n- records: {records['uri']}\n{links}\n")
    create_markdown_artifact(md, key="layer-report", description="Score histogram and links to the outputs")
    if site:
        create_markdown_artifact(viewer_markdown(site), key="viewer",
                                 description="How to open the neuron viewer: the command that serves it over http")
    return {"units": len(headline), "summary": summary, "cost": cost, "dead_units": len(dead)}


def budget_stop(ledger):
    """The end of a run that its budget stopped: the layer report says so (what was spent, how to go
    on), and the flow ends Completed, named BudgetReached, with that in its message. Nothing of the
    finished work is lost: the units the stages finished are memoised and every paid answer is in
    the response cache, so the same run with a larger budget resumes and pays only for what is new."""
    from prefect.states import Completed

    line = f"the budget of {ledger.budget} is reached ({ledger.spent_text()}); finished units are kept"
    resume = "Rerun with a larger budget (CLI `--budget`, flow parameter `budget`) to go on."
    md = (f"# Layer report: stopped by the budget\n\n{line}\n\n{resume} Units finished before the stop are "
          "kept (per-unit memos) and every answer paid for is in the response cache: none is asked again.\n")
    create_markdown_artifact(md, key="layer-report", description="The run stopped at its budget")
    data = {"stopped": "budget", "message": f"stopped: {line}. {resume}", "budget": str(ledger.budget),
            "dollars": ledger.dollars, "tokens": ledger.tokens}
    return Completed(name="BudgetReached", message=data["message"], data=data)
