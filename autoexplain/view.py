"""Neuron viewer: a static site built from one or more layers' scores folders.

`build_site(score_dirs, site_dir)` follows each scores folder's manifest to its simulations folder
(chosen explanations, simulated activations) and on to its records folder (exemplars, statistics),
and writes a site that needs no server: open `index.html` from disk or serve the folder.

Layout of the site folder:

    index.html                      overview: layers, score-by-layer and baseline plots, search
    layer.html#L<layer>             one layer: histogram, best/worst units, sortable table, search
    unit.html#L<layer>/N<unit><+|->  one unit: explanation, candidates, scores, exemplars, simulations
    assets/viewer.js, viewer.css    the page code (no framework, nothing fetched from elsewhere)
    plots/*.png                     matplotlib plots (`autoexplain.plots`), usable on their own
    data/site.js                    the layers and their summary numbers
    data/L<layer>/summary.js        one layer: counts, means, best and worst units
    data/L<layer>/index_<k>.js      per-unit summary rows (explanation, scores, CIs), `chunk_size` a file
    data/L<layer>/u/<unit><p|n>.js  one unit's details, loaded only by its unit page

Data files are scripts that assign to `window.__data[key]` (loaded by <script> tags), because
`fetch()` of a file:// URL fails. Everything a page shows from the data is put in the DOM with
`textContent`, never parsed as HTML, and the JSON inside the scripts escapes `<`, `>` and `&`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import polars as pl

from autoexplain.errors import UserError
from autoexplain.identity import code_identity
from autoexplain.records import QUANTILE_BINS
from autoexplain.storage import content_key, read_manifest
from autoexplain.summary import run_cost, unit_costs
from autoexplain.view_data import (METHODS, METRICS, PRIMARY_METRIC, explanations_of, index_chunk, index_frame, js_text,
                                   layer_summary, records_part, scores_of, sims_of, to_json, unit_key, unit_list,
                                   unit_name, write_js)
from autoexplain.view_pages import INDEX_BODY, LAYER_BODY, UNIT_BODY, page
from autoexplain.view_sources import LayerSource, find_sources, read_chosen, read_scores, records_reader, sims_frame

ASSETS = Path(__file__).parent / "viewer"


class _RecordsCache:
    """Each unit's records part as finished JSON, kept in the site's hidden `.cache` folder (not
    uploaded with the site) and keyed by the records output, the exemplar settings and this
    module's code: re-simulating a layer rebuilds its pages without reading the records again (the
    bulk of a rebuild's time and of the pages' bytes). JSON, not pickle: a site folder gets copied
    and published, and loading it must never run code."""

    def __init__(self, site_dir: Path, src: LayerSource, max_per_kind):
        self.fragments: dict[str, str] = {}
        self.path, self.changed = None, False
        if src.records_dir is None:
            return
        key = content_key({"records": read_manifest(src.records_dir)["key"], "layer": src.layer,
                           "max_per_kind": max_per_kind, "code": code_identity("autoexplain.view")})
        self.path = site_dir / ".cache" / f"L{src.layer}-records-{key}.jsonl"
        if self.path.is_file():
            # Line 1: the unit names; then one fragment per line (compact JSON holds no raw newline).
            # Split, not parsed: parsing a layer's exemplars back took longer than the rest of a rebuild.
            names, *fragments = self.path.read_bytes().decode("utf-8").split("\n")
            self.fragments = dict(zip(json.loads(names), fragments))

    def missing(self, names: list[str]) -> bool:
        return any(n not in self.fragments for n in names)

    def add(self, name: str, part: dict) -> None:
        self.fragments[name] = to_json(part)[1:-1]
        self.changed = True

    def save(self) -> None:
        if not (self.path and self.changed):
            return
        for old in self.path.parent.glob(self.path.name.split("-records-")[0] + "-records-*.jsonl"):
            old.unlink(missing_ok=True)  # one cache per layer: the records of an earlier run go
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_bytes("\n".join([json.dumps(list(self.fragments)), *self.fragments.values()]).encode("utf-8"))
        tmp.replace(self.path)


# ---------------------------------------------------------------- build


def build_site(score_dirs: list[Path], site_dir: Path, records_dir: Path | None = None, *,
               title: str = "autoexplain neuron viewer", chunk_size: int = 1000,
               max_per_kind: int | None = 20, unit_block: int | None = None, plots: bool = True) -> Path:
    """Write the static viewer for the layers of `score_dirs` into `site_dir`; returns its index.html.

    records_dir: the records folder, when the simulations' manifests do not point at a readable one.
    chunk_size: units per index file. max_per_kind: top and random exemplars kept per unit (besides
    the test-split ones, which are always kept); None keeps all. unit_block: neurons per unit-detail
    file (default: 1 when there are records to show, so a unit page loads only its own exemplars;
    100 without, when details are small). plots: write the matplotlib PNGs.
    """
    started = time.perf_counter()
    site_dir = Path(site_dir)
    sources = find_sources(score_dirs, records_dir)
    (site_dir / "assets").mkdir(parents=True, exist_ok=True)
    (site_dir / "data").mkdir(exist_ok=True)
    for name in ("viewer.js", "viewer.css"):
        shutil.copyfile(ASSETS / name, site_dir / "assets" / name)

    layers_meta, all_scores = [], []
    for src in sources:
        scores, chosen = read_scores(src), read_chosen(src)
        for name, table in (("scores", scores), ("chosen explanations", chosen)):
            found = set(table.get_column("layer").unique().to_list()) if "layer" in table.columns else set()
            if found - {src.layer}:
                raise UserError(f"the {name} of {src.scores_dirs[0]} hold rows of layer(s) {sorted(found)}, "
                                f"but its manifest says layer {src.layer}",
                                "rerun the explain, simulate and score stages for that layer")
        all_scores.append(scores)
        units = unit_list(scores, chosen)
        index = index_frame(units, scores, chosen)
        ldir = site_dir / "data" / f"L{src.layer}"
        if ldir.exists():
            shutil.rmtree(ldir)
        (ldir / "u").mkdir(parents=True)
        summary = layer_summary(src.layer, index, chunk_size, src)
        summary["cost"] = run_cost(scores)  # what the layer's scored units cost, as the run's summary line says
        summary["unit_block"] = unit_block or (1 if src.records_dir is not None else 100)
        if not plots:
            summary["plot"] = None
        for k in range(summary["n_chunks"]):
            write_js(ldir / f"index_{k}.js", f"L{src.layer}/index/{k}",
                      index_chunk(index.slice(k * chunk_size, chunk_size)))
        write_js(ldir / "summary.js", f"L{src.layer}/summary", summary)
        _write_units(src, units, scores, chosen, site_dir, max_per_kind, summary["unit_block"])
        if plots:
            from autoexplain.plots import plot_score_distribution

            plot_score_distribution(scores, site_dir / summary["plot"])
        layers_meta.append({k: summary[k] for k in ("layer", "n_units", "n_scored", "n_chunks", "chunk_size",
                                                     "unit_block", "means", "llm_beats", "simulator",
                                                     "has_records", "cost")})

    plot_files = []
    if plots:
        from autoexplain.plots import plot_llm_vs_baselines, plot_mean_by_layer, plot_score_distribution

        everything = pl.concat(all_scores, how="diagonal_relaxed")
        if len(sources) > 1:
            plot_mean_by_layer(everything, site_dir / "plots" / "mean_by_layer.png")
            plot_files.append(["plots/mean_by_layer.png", "Mean score by layer"])
            plot_score_distribution(everything, site_dir / "plots" / "score_distribution.png")
            plot_files.append(["plots/score_distribution.png", "Score distribution, all layers"])
        plot_llm_vs_baselines(everything, site_dir / "plots" / "llm_vs_baselines.png")
        plot_files.append(["plots/llm_vs_baselines.png", "Explanation against the baselines, per unit"])
    site = {"title": title, "metric": PRIMARY_METRIC, "metrics": list(METRICS), "methods": list(METHODS),
            "quantile_bins": [list(b) for b in QUANTILE_BINS], "layers": layers_meta, "plots": plot_files,
            "built": time.strftime("%Y-%m-%d %H:%M:%S"), "build_seconds": round(time.perf_counter() - started, 2)}
    write_js(site_dir / "data" / "site.js", "site", site)
    for name, body in (("index", INDEX_BODY), ("layer", LAYER_BODY), ("unit", UNIT_BODY)):
        (site_dir / f"{name}.html").write_text(page(name, title, body), encoding="utf-8")
    return site_dir / "index.html"


def _write_units(src, units: pl.DataFrame, scores, chosen, site_dir: Path, max_per_kind, block: int) -> None:
    """One file per `block` neurons (both polarities): data/L<layer>/u/<unit // block>.js."""
    expl, sc, simulated = explanations_of(chosen), scores_of(scores), sims_frame(src)
    costs = ({(u, p): d for _, u, p, d in unit_costs(scores).iter_rows()} if "dollars" in scores.columns else {})
    reader = records_reader(src)
    udir = site_dir / "data" / f"L{src.layer}" / "u"
    cache = _RecordsCache(site_dir, src, max_per_kind) if reader else None
    no_records = to_json(records_part(None, max_per_kind))[1:-1]
    keys = [(int(u), int(p)) for u, p in units.select("unit", "polarity").iter_rows()]
    position = {k: j for j, k in enumerate(keys)}
    L = src.layer
    groups: dict[int, list[tuple[int, int]]] = {}
    for k in keys:
        groups.setdefault(k[0] // block, []).append(k)
    batch: list[int] = []
    for n, b in enumerate(sorted(groups)):
        batch.append(b)
        if sum(len(groups[x]) for x in batch) < 1024 and n + 1 < len(groups):
            continue
        wanted = [k for x in batch for k in groups[x]]
        if cache is not None and cache.missing([unit_name(u, p) for u, p in wanted]):
            recs = reader(wanted)
            for u, p in wanted:
                cache.add(unit_name(u, p), records_part(recs.get((u, p)), max_per_kind))
        sims = sims_of(simulated, wanted)
        for x in batch:
            parts = []
            for u, p in groups[x]:
                j = position[(u, p)]
                detail = {"layer": L, "unit": u, "polarity": p, "explanations": expl.get((u, p)) or {},
                          "scores": sc.get((u, p)) or {}, "cost": costs.get((u, p)),
                          "prev": unit_key(L, *keys[j - 1]) if j > 0 else None,
                          "next": unit_key(L, *keys[j + 1]) if j + 1 < len(keys) else None,
                          "other": unit_key(L, u, -p) if (u, -p) in position else None}
                records = cache.fragments[unit_name(u, p)] if cache is not None else no_records
                parts.append(f'{to_json(unit_name(u, p))}:{{{to_json(detail)[1:-1]},"sims":{sims.get((u, p), "{}")},{records}}}')
            text = js_text(f"L{L}/u/{x}", "{" + ",".join(parts) + "}")
            (udir / f"{x}.js").write_bytes(text.encode("utf-8", errors="replace"))
        batch = []
    if cache is not None:
        cache.save()
