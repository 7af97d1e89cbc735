"""Neuron viewer: a static site built from the scores folders of one or more layers and unit sources.

`build_site(score_dirs, site_dir)` follows each scores folder's manifest to its simulations folder
(chosen explanations, simulated activations) and on to its records folder (exemplars, statistics),
and writes a site that needs no server: open `index.html` from disk or serve the folder.

Units are grouped by source, 'L<layer>/<kind>' (`records.UnitId.source`: 'L15/mlp', 'L15/sae-res-16k').
Layout of the site folder, which is exactly what gets published (caches live under the output root):

    index.html                          overview: layers x sources with score distributions, the best
                                        units of each, plots, search by text and by meaning
    layer.html#L15/mlp                  one source: histogram, best/worst units, sortable table, search
    unit.html#L15/mlp/N1234+            one unit (`view_data.unit_page` makes the name): explanation,
                                        candidates, scores, exemplars, simulations, similar units
    assets/viewer.js, viewer.css        the page code (no framework, nothing fetched from elsewhere)
    plots/*.png                         matplotlib plots (`autoexplain.plots`), usable on their own
    data/site.js                        the sources and their summary numbers
    data/<source>/summary.js            one source: counts, means, best and worst units
    data/<source>/index_<k>.js          per-unit summary rows (explanation, scores, CIs), `chunk_size` a file
    data/<source>/u/<unit><p|n|>.js     one unit, gzip-compressed JSON in base64 (`view_pack`)
    data/<source>/meaning.js            explanation vectors for search by meaning (`view_meaning`)
    data/words.js                       word vectors a query is embedded with (`view_meaning`)

Data files are scripts that assign to `window.__data[key]` (loaded by <script> tags), because
`fetch()` of a file:// URL fails. Everything a page shows from the data is put in the DOM with
`textContent`, never parsed as HTML, and the JSON inside the scripts escapes `<`, `>` and `&`.
"""

from __future__ import annotations

import bisect
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from autoexplain import files, layout
from autoexplain.errors import UserError
from autoexplain.identity import code_identity
from autoexplain.layer import dead_of_run
from autoexplain.records import QUANTILE_BINS
from autoexplain.sources import MLP
from autoexplain.storage import content_key, read_manifest
from autoexplain.summary import run_cost, unit_costs
from autoexplain.view_data import (METHODS, METRICS, PRIMARY_METRIC, explanations_of, index_chunk, index_frame,
                                   layer_summary, records_part, score_histogram, scores_of, sims_digests, sims_of,
                                   to_json, unit_file, unit_list, unit_name, unit_page, write_js)
from autoexplain.view_pack import Tail, packed, tail
from autoexplain.view_pages import INDEX_BODY, LAYER_BODY, UNIT_BODY, page
from autoexplain.view_sources import (LayerSource, NeverFired, find_sources, read_chosen, read_scores, records_reader,
                                      sims_frame, unscored)
from autoexplain.view_written import Written

ASSETS = Path(__file__).parent / "viewer"
N_BEST_OVERVIEW = 5  # best units of each source on the overview page


def cache_root(score_dirs: list[Path]) -> Path:
    """Where a site's build caches go: the memo area of the output root the scores came from
    (`<root>/memo/view`), never the site folder, which is published as it is."""
    return layout.memo(layout.root_of(Path(score_dirs[0]).resolve()), "view")


class _RecordsCache:
    """Each unit's records part, finished and compressed (`view_pack.Tail`), keyed by the records
    output, the exemplar settings and this module's code: re-simulating a layer rebuilds its pages
    without reading the records or compressing their exemplars again (the bulk of a rebuild's time
    without embeddings). One parquet per source under the output root's cache area, about 20 KB a
    unit; the cache of an earlier recording of the source is removed. Data, not pickle: loading it
    never runs code."""

    def __init__(self, cache_dir: Path, src: LayerSource, max_per_kind):
        self.tails: dict[str, Tail] = {}
        self.path, self.changed = None, False
        if src.records_dir is None:
            return
        key = content_key({"records": read_manifest(src.records_dir)["key"], "source": src.source,
                           "max_per_kind": max_per_kind, "code": code_identity("autoexplain.view")})
        self.stem = src.source.replace("/", "-")
        self.path = cache_dir / f"{self.stem}-records-{key}.parquet"
        if self.path.is_file():
            t = pl.read_parquet(self.path)
            self.tails = {n: Tail(z, c, k) for n, z, c, k in zip(*(t[c].to_list() for c in ("name", "z", "crc", "size")))}

    def missing(self, names: list[str]) -> bool:
        return any(n not in self.tails for n in names)

    def add(self, parts: dict[str, dict], pool: ThreadPoolExecutor) -> None:
        """Each unit's records part, by unit name; compressed in `pool` (zlib lets go of the GIL)."""
        texts = [to_json(part)[1:-1] + "}" for part in parts.values()]
        self.tails.update(zip(parts, pool.map(tail, texts)))
        self.changed = True

    def save(self) -> None:
        if not (self.path and self.changed):
            return
        for old in self.path.parent.glob(f"{self.stem}-records-*.parquet"):
            old.unlink(missing_ok=True)  # one cache per source: the records of an earlier run go
        t = list(self.tails.values())
        table = pl.DataFrame({"name": list(self.tails), "z": pl.Series([x.z for x in t], dtype=pl.Binary),
                              "crc": pl.Series([x.crc for x in t], dtype=pl.UInt32),
                              "size": pl.Series([x.size for x in t], dtype=pl.Int64)})
        with files.replacing(self.path) as tmp:  # deflate data does not shrink further
            table.write_parquet(tmp, compression="uncompressed")


PAGES = ("index", "layer", "unit")  # the pages a build writes at the top of the site (NAME.html)


def _check_site(site_dir: Path) -> None:
    """Refuse a folder that no viewer build wrote where this one would empty or replace the user's
    files: its 'data' folder, or pages named as the site's."""
    fix = "pass a new or empty folder for the site (or the folder of an earlier site)"
    for folder in (site_dir, *site_dir.absolute().parents):
        if (folder / layout.MANIFEST).is_file():  # a sealed stage output: its manifest lists its files
            stage = read_manifest(folder).get("stage") or "stage"
            where = "" if folder == site_dir else f"inside the finished {stage} folder {folder}"
            raise UserError(f"{site_dir} is {where or f'a finished {stage} folder'}; a site there would mix "
                            "with its outputs", fix)
    if (site_dir / "data" / "site.js").is_file():
        return  # an earlier build's: rebuilt in place
    if (site_dir / "data").is_dir() and any((site_dir / "data").iterdir()):
        raise UserError(f"{site_dir} holds a 'data' folder that no viewer build wrote", fix)
    theirs = [f"{name}.html" for name in PAGES if (site_dir / f"{name}.html").exists()]
    if theirs:
        raise UserError(f"{site_dir} holds {theirs[0]}, which no viewer build wrote and this one would replace", fix)


# The site's folders that each build writes whole (`_clear_site` empties them first): an uploaded
# site drops at its URL what a rebuild dropped here.
BUILT_WHOLE = ("assets", "data", "plots")


def _clear_site(site_dir: Path, keep: set[str]) -> None:
    """Remove what an earlier build wrote (data of other layers, the hidden cache older versions
    kept here), except the unit files `keep` (paths in the site) that this build may find
    unchanged (`view_written`), so the folder holds this build only."""
    for name in ("plots", "assets", ".cache"):
        if (site_dir / name).is_dir():
            shutil.rmtree(site_dir / name)
    for folder, dirs, names in os.walk(site_dir / "data", topdown=False):
        for name in names:
            path = Path(folder, name)
            if path.relative_to(site_dir).as_posix() not in keep:
                path.unlink()
        for name in dirs:
            if not any(Path(folder, name).iterdir()):
                Path(folder, name).rmdir()


# ---------------------------------------------------------------- build


def site_folder(site: str, build: bool) -> Path:
    """Where on this machine `view` writes or serves `--site`: a folder, a file:// URL's folder, or to
    build a site at another URL, that URL's local mirror (uploaded after the build). Serving a site
    that is at such a URL only would need it downloaded first: refused, before any work."""
    from autoexplain import remote

    if not remote.is_url(site):
        return Path(site)
    if site.startswith("file://"):
        return remote.local_path(site)
    if not build:
        raise UserError(f"--site {site}: --serve serves a folder on this machine, and this site is at a URL",
                        "copy the site into a folder here and pass that folder, or add --scores to build it here")
    return remote.open_root(site)


def build_site(score_dirs: list[Path], site_dir: Path, records_dir: Path | None = None, *,
               title: str = "autoexplain neuron viewer", chunk_size: int = 1000,
               max_per_kind: int | None = 20, plots: bool = True, meaning: bool = True,
               cache_dir: Path | None = None, pages: list[tuple[str, str]] = (),
               never_fired: list[NeverFired] | None = None) -> Path:
    """Write the static viewer for the sources of `score_dirs` into `site_dir`; returns its index.html.

    records_dir: the records folder, when the simulations' manifests do not point at a readable one.
    chunk_size: units per index file. max_per_kind: top and random exemplars kept per unit (besides
    the test-split ones, which are always kept); None keeps all. plots: write the matplotlib PNGs.
    meaning: embed the explanations (MiniLM) for search by meaning and "similar units".
    cache_dir: build caches (default `cache_root(score_dirs)`). pages: (file, title) of pages that
    the caller writes beside the site (a model report, the scorers' agreement), linked from the overview.
    never_fired: per source of the run, its units asked for that never fired (a source without scores,
    all of whose units never fired, is shown with them); None: as the output root's run pointers say.
    """
    started = time.perf_counter()
    site_dir = Path(site_dir)
    sources = find_sources(score_dirs, records_dir) if score_dirs or not never_fired else []
    dead = {n.source: n.units for n in never_fired} if never_fired is not None else _dead_of_runs(sources)
    have = {s.source for s in sources}
    sources = sorted([*sources, *(unscored(n) for n in never_fired or () if n.source not in have and n.units)],
                     key=lambda s: (s.layer, s.source != f"L{s.layer}/mlp", s.source))
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root(
        [s.scores_dirs[0] if s.scores_dirs else s.records_dir for s in sources])
    _check_site(site_dir)

    prepared, all_scores = [], []
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
        prepared.append((src, scores, chosen, units, index_frame(units, scores, chosen),
                         bool((units["polarity"] < 0).any())))

    _clear_site(site_dir, {unit_file(src.source, u, p, polar) for src, _, _, units, _, polar in prepared
                           for u, p in [*units.select("unit", "polarity").iter_rows(), *((u, 1) for u in dead.get(src.source, ()))]})
    (site_dir / "assets").mkdir(parents=True, exist_ok=True)
    (site_dir / "data").mkdir(exist_ok=True)
    for name in ("viewer.js", "viewer.css"):
        shutil.copyfile(ASSETS / name, site_dir / "assets" / name)
    written = Written(cache_dir, site_dir)

    similar: dict[str, list] = {}
    if meaning:
        from autoexplain.view_meaning import write_meaning

        similar = write_meaning(site_dir, [(src.source, [unit_page(src.source, u, p, polar) for u, p in
                                                          index.select("unit", "polarity").iter_rows()],
                                            index["text"].to_list(), index[f"{PRIMARY_METRIC}:v"].to_list())
                                           for src, _, _, _, index, polar in prepared], cache_dir)

    sources_meta = []
    for src, scores, chosen, units, index, polar in prepared:
        sdir = site_dir / "data" / src.source
        (sdir / "u").mkdir(parents=True, exist_ok=True)
        summary = layer_summary(src, index, chunk_size, polar)
        summary["cost"] = run_cost(scores)  # what the source's scored units cost, as the run's summary line says
        summary["meaning"] = meaning
        # units that never fired (a coder's dead latents): not explained, so in no index; said so
        summary["dead"] = dead.get(src.source, [])
        if not plots or not scores.height:
            summary["plot"] = None
        for k in range(summary["n_chunks"]):
            write_js(sdir / f"index_{k}.js", f"{src.source}/index/{k}",
                     index_chunk(index.slice(k * chunk_size, chunk_size)))
        write_js(sdir / "summary.js", f"{src.source}/summary", summary)
        _write_units(src, units, scores, chosen, site_dir, max_per_kind, polar, similar, cache_dir, written,
                     summary["dead"])
        if summary["plot"]:
            from autoexplain.plots import plot_score_distribution

            plot_score_distribution(scores, site_dir / summary["plot"])
        meta = {k: summary[k] for k in ("layer", "source", "kind", "polar", "n_units", "n_scored", "dead", "n_chunks",
                                        "chunk_size", "means", "llm_beats", "simulator", "has_records", "cost")}
        meta["hist"] = score_histogram(index)
        meta["best"] = summary["best"][:N_BEST_OVERVIEW]
        sources_meta.append(meta)

    plot_files = []
    if plots and any(s.height for s in all_scores):
        from autoexplain.plots import plot_llm_vs_baselines, plot_mean_by_layer, plot_score_distribution

        everything = pl.concat(all_scores, how="diagonal_relaxed")
        if len({s.layer for s in sources}) > 1:
            # neurons and each coder's latents apart: a mean over both would describe neither
            kinds = (everything["source"].fill_null(MLP.kind) if "source" in everything.columns
                     else pl.Series([MLP.kind] * everything.height))
            for kind in sorted(set(kinds), key=lambda k: (k != MLP.kind, k)):
                part = everything.filter(kinds == kind)
                if part["layer"].n_unique() < 2:
                    continue
                name = "mean_by_layer.png" if kind == MLP.kind else f"mean_by_layer.{kind}.png"
                whose = "MLP neurons" if kind == MLP.kind else f"{kind} latents"
                plot_mean_by_layer(part, site_dir / "plots" / name, units=whose)
                plot_files.append([f"plots/{name}", f"Mean score by layer, {whose}"])
            plot_score_distribution(everything, site_dir / "plots" / "score_distribution.png")
            plot_files.append(["plots/score_distribution.png", "Score distribution, all layers and sources"])
        plot_llm_vs_baselines(everything, site_dir / "plots" / "llm_vs_baselines.png")
        plot_files.append(["plots/llm_vs_baselines.png", "Explanation against the baselines, per unit"])
    site = {"title": title, "metric": PRIMARY_METRIC, "metrics": list(METRICS), "methods": list(METHODS),
            "quantile_bins": [list(b) for b in QUANTILE_BINS], "sources": sources_meta, "plots": plot_files,
            "pages": [list(p) for p in pages],
            "meaning": meaning, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
            "build_seconds": round(time.perf_counter() - started, 2)}
    write_js(site_dir / "data" / "site.js", "site", site)
    written.save()
    for name, body in zip(PAGES, (INDEX_BODY, LAYER_BODY, UNIT_BODY)):
        (site_dir / f"{name}.html").write_text(page(name, title, body), encoding="utf-8")
    return site_dir / "index.html"


def _dead_of_runs(sources: list[LayerSource]) -> dict[str, list[int]]:
    """A site built from scores folders alone (`autoexplain view`): each source's units that never
    fired as the run pointer that names those scores says (`dead_of_run`), not every dead unit of
    the recording; none where no run of the output root names them."""
    from autoexplain.storage import read_run

    dead = {}
    for src in sources:
        kind = src.source.split("/", 1)[1]
        try:
            run = read_run(layout.root_of(src.scores_dirs[0].resolve()), src.layer, kind)
        except UserError:  # an unreadable pointer is no reason to refuse a site of its scores
            continue
        mine = {Path(r["path"]).parent.resolve() for r in (run or {}).get("scores", [])}
        if mine and mine == {d.resolve() for d in src.scores_dirs}:
            dead[src.source] = dead_of_run(run)
    return dead


def _write_units(src: LayerSource, units: pl.DataFrame, scores, chosen, site_dir: Path, max_per_kind, polar: bool,
                 similar: dict[str, list], cache_dir: Path, written: Written, dead: list[int]) -> None:
    """One file per unit: data/<source>/u/<unit><p|n|>.js (`unit_file`). A file whose content is
    what the last build wrote there is left as it is (`view_written`). A unit asked for that never
    fired (`dead`) has one too, with its statistics and links to the explained units beside it, but
    is not in the explained units' previous / next chain."""
    expl, sc, simulated = explanations_of(chosen), scores_of(scores), sims_frame(src)
    costs = ({(u, p): d for _, u, p, d in unit_costs(scores).iter_rows()} if "dollars" in scores.columns else {})
    reader = records_reader(src)
    cache = _RecordsCache(cache_dir, src, max_per_kind) if reader else None
    no_records = tail(to_json(records_part(None, max_per_kind))[1:-1] + "}")
    tail_id = cache.path.name if cache is not None else content_key(["no records", max_per_kind])
    sims_digest = sims_digests(simulated)
    keys = [(int(u), int(p)) for u, p in units.select("unit", "polarity").iter_rows()]
    position = {k: j for j, k in enumerate(keys)}
    never = sorted(set(dead) - {u for u, _ in keys})
    S, L = src.source, src.layer
    written.look_in(site_dir, f"data/{S}/u")

    def name(k):
        return unit_page(S, k[0], k[1], polar)

    def at(j):  # the explained unit at position j, if there is one
        return name(keys[j]) if 0 <= j < len(keys) else None

    # zlib lets go of the GIL while it compresses: one thread a core.
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    every = keys + [(u, 1) for u in never]
    for start in range(0, len(every), 1024):
        todo = []  # (unit, file, its digest, the head's details)
        for u, p in every[start:start + 1024]:
            j = position.get((u, p))
            if j is None:  # a unit that never fired: between the explained units before and after it
                after = bisect.bisect_left(keys, u, key=lambda k: k[0])
                prev, nxt = at(after - 1), at(after)
            else:
                prev, nxt = at(j - 1), at(j + 1)
            detail = {"source": S, "layer": L, "unit": u, "polarity": p, "name": name((u, p)),
                      "explanations": expl.get((u, p)) or {}, "scores": sc.get((u, p)) or {}, "cost": costs.get((u, p)),
                      "prev": prev, "next": nxt, "other": name((u, -p)) if (u, -p) in position else None,
                      "similar": similar.get(name((u, p)), []), **({"dead": True} if j is None else {})}
            text, file = to_json(detail)[1:-1], unit_file(S, u, p, polar)
            d = content_key([file, text, sims_digest.get((u, p)), tail_id], 32)  # what the file follows from
            if not written.unchanged(file, d):
                todo.append(((u, p), file, d, text))
        if not todo:
            continue
        wanted = [k for k, _, _, _ in todo]
        if cache is not None and cache.missing([unit_name(u, p) for u, p in wanted]):
            recs = reader(wanted)
            cache.add({unit_name(u, p): records_part(recs.get((u, p)), max_per_kind) for u, p in wanted}, pool)
        sims = sims_of(simulated, wanted)

        def write(job):
            (u, p), file, d, text = job
            data = packed(name((u, p)), f'{{{text},"sims":{sims.get((u, p), "{}")},',
                          cache.tails[unit_name(u, p)] if cache is not None else no_records)
            (site_dir / file).write_bytes(data)
            return file, d, len(data)

        for file, d, size in pool.map(write, todo):
            written.wrote(file, d, size)
    pool.shutdown()
    if cache is not None:
        cache.save()
