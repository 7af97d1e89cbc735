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

import html
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import polars as pl

from autoexplain.errors import UserError
from autoexplain.records import QUANTILE_BINS
from autoexplain.identity import code_identity
from autoexplain.storage import content_key, is_complete, read_manifest

PRIMARY_METRIC = "top_and_random"
METRICS = ("top_and_random", "random_only", "calibrated_r2", "calibrated_abs_dev_explained", "detection_auc")
METHODS = ("explainer", "token-lookup", "shuffled")
BASELINES = ("token-lookup", "shuffled")
ASSETS = Path(__file__).parent / "viewer"
N_BEST = 10
N_TOP_TOKENS = 20


@dataclass
class LayerSource:
    """Where one layer's tables live, found by following the manifests. A layer explained in shards
    of units has one scores folder (and simulations folder) per shard, all from one recording."""

    layer: int
    scores_dirs: list[Path]
    simulations_dirs: list[Path]
    records_dir: Path | None
    simulator: str


# ---------------------------------------------------------------- inputs


def _resolve(ref: str | None, near: Path, stage: str) -> Path | None:
    """A manifest's input path, or the folder of the same name under this output root's `stage/`."""
    if not ref:
        return None
    as_given = Path(ref)
    for candidate in (as_given, near.parent.parent / stage / as_given.name):
        if is_complete(candidate):
            return candidate
    return None


def find_sources(score_dirs: Iterable[str | Path], records_dir: str | Path | None = None) -> list[LayerSource]:
    sources: dict[int, LayerSource] = {}
    for d in score_dirs:
        d = Path(d)
        if not is_complete(d):
            raise UserError(f"{d} is not a finished scores folder (no manifest.json)",
                            "pass folders printed by `autoexplain score`")
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
            recs = Path(records_dir)
            if not is_complete(recs):
                raise UserError(f"{recs} is not a finished records folder", "pass the folder printed by `autoexplain record`")
        if recs is not None and layer not in read_manifest(recs).get("params", {}).get("layers", []):
            if records_dir is not None:
                raise UserError(f"layer {layer} was not recorded in {recs}", "pass the records folder of that run")
            recs = None
        src = sources.get(layer)
        if src is None:
            sources[layer] = LayerSource(layer, [d], [sims] if sims else [], recs, simulator)
            continue
        # Another shard of a layer already seen: a different folder, from the same recording and
        # simulator (the layer page states one of each).
        if d.resolve() in {x.resolve() for x in src.scores_dirs}:
            raise UserError(f"layer {layer} comes twice ({d})",
                            "build one site per run: one scores folder per layer, or the shards of one run")
        if (recs, simulator) != (src.records_dir, src.simulator):
            raise UserError(f"the scores of layer {layer} in {src.scores_dirs[0]} and {d} come from different "
                            f"recordings or simulators", "build one site per run: pass the shards of one run")
        src.scores_dirs.append(d)
        src.simulations_dirs += [sims] if sims else []
    if not sources:
        raise UserError("no scores folders given", "pass at least one folder printed by `autoexplain score`")
    return [sources[L] for L in sorted(sources)]


def _scores(src: LayerSource) -> pl.DataFrame:
    df = pl.concat([pl.read_parquet(d / f"layer_{src.layer}.parquet") for d in src.scores_dirs], how="diagonal_relaxed")
    if df.select("unit", "polarity", "method", "metric", *(["split"] if "split" in df.columns else [])).is_duplicated().any():
        raise UserError(f"the scores folders of layer {src.layer} overlap: some units are scored twice",
                        "pass the shards of one run, each unit in one of them")
    if "split" in df.columns and (df["split"] == "test").any():
        df = df.filter(pl.col("split") == "test")
    return df.with_columns(pl.col("value").fill_nan(None), pl.col("ci_low").fill_nan(None),
                           pl.col("ci_high").fill_nan(None))


def _chosen(src: LayerSource) -> pl.DataFrame:
    paths = [d / "chosen.parquet" for d in src.simulations_dirs if (d / "chosen.parquet").is_file()]
    if paths:
        return pl.concat([pl.read_parquet(p) for p in paths], how="diagonal_relaxed")
    return pl.DataFrame(schema={"unit": pl.Int32, "polarity": pl.Int8, "method": pl.Utf8, "explainer": pl.Utf8,
                                "text": pl.Utf8, "candidates": pl.List(pl.Utf8),
                                "candidate_valid_scores": pl.List(pl.Float64)})


# ---------------------------------------------------------------- output helpers


def _finite(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _r(x, digits: int = 4) -> float | None:
    x = _finite(x)
    return None if x is None else round(x, digits)


def _rel_round(values, scale: float) -> list:
    """Round to 3 significant digits of `scale` (plenty for colours and tooltips); None for non-finite."""
    a = np.asarray(values, dtype=np.float64)
    digits = 3 - int(math.floor(math.log10(scale))) if scale > 0 and math.isfinite(scale) else 6
    out = np.round(a, max(0, min(digits, 12))).tolist()
    if not np.isfinite(a).all():
        out = [v if math.isfinite(v) else None for v in out]
    return out


def _rel_round_each(rows: list, scale: float) -> list[list]:
    """`_rel_round` of several lists with one scale, in one numpy call."""
    if not rows:
        return []
    flat = _rel_round(np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in rows]), scale)
    ends = np.cumsum([len(r) for r in rows]).tolist()
    return [flat[s:e] for s, e in zip([0, *ends[:-1]], ends)]


def _json(data: Any) -> str:
    """Compact JSON that is safe inside a <script>: no '<', '>', '&' or line separators."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (body.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _js_text(key: str, body: str) -> str:
    return f"(window.__data=window.__data||{{}})[{json.dumps(key)}]={body};\n"


def js_data(key: str, data: Any) -> str:
    """A script that stores `data` at `window.__data[key]`; safe to load with <script src>."""
    return _js_text(key, _json(data))


def _write_js(path: Path, key: str, data: Any) -> int:
    text = js_data(key, data).encode("utf-8", errors="replace")
    path.write_bytes(text)
    return len(text)


def unit_key(layer: int, unit: int, polarity: int) -> str:
    return f"L{layer}/N{unit}{'+' if polarity > 0 else '-'}"


def unit_name(unit: int, polarity: int) -> str:
    return f"{unit}{'+' if polarity > 0 else '-'}"


# ---------------------------------------------------------------- layer tables


def _unit_list(scores: pl.DataFrame, chosen: pl.DataFrame) -> pl.DataFrame:
    keys = pl.concat([scores.select(pl.col("unit").cast(pl.Int64), pl.col("polarity").cast(pl.Int64)),
                      chosen.select(pl.col("unit").cast(pl.Int64), pl.col("polarity").cast(pl.Int64))])
    return keys.unique().sort(["unit", "polarity"], descending=[False, True])


def _index_frame(units: pl.DataFrame, scores: pl.DataFrame, chosen: pl.DataFrame) -> pl.DataFrame:
    """One row per unit: the chosen explanation, every metric (llm with CI) and the baselines' values."""
    on = ["unit", "polarity"]
    s = scores.with_columns(pl.col("unit").cast(pl.Int64), pl.col("polarity").cast(pl.Int64))
    text = (chosen.filter(pl.col("method") == "explainer")
            .select(pl.col("unit").cast(pl.Int64), pl.col("polarity").cast(pl.Int64), pl.col("text"))
            .unique(on, keep="first"))
    df = units.join(text, on=on, how="left").with_columns(pl.col("text").fill_null(""))
    for metric in METRICS:
        part = s.filter(pl.col("metric") == metric)
        llm = (part.filter(pl.col("method") == "explainer").unique(on, keep="first")
               .select(*on, pl.col("value").alias(f"{metric}:v"), pl.col("ci_low").alias(f"{metric}:lo"),
                       pl.col("ci_high").alias(f"{metric}:hi")))
        df = df.join(llm, on=on, how="left")
        for base in BASELINES:
            b = (part.filter(pl.col("method") == base).unique(on, keep="first")
                 .select(*on, pl.col("value").alias(f"{metric}:{base}")))
            df = df.join(b, on=on, how="left")
    num = [c for c in df.columns if ":" in c]
    return df.with_columns([pl.col(c).cast(pl.Float64).fill_nan(None).round(4) for c in num])


def _index_chunk(df: pl.DataFrame) -> dict:
    cols = {c: df.get_column(c).to_list() for c in df.columns}
    return {
        "u": cols["unit"], "p": cols["polarity"], "t": cols["text"],
        "m": {metric: {"v": cols[f"{metric}:v"], "lo": cols[f"{metric}:lo"], "hi": cols[f"{metric}:hi"],
                       **{base: cols[f"{metric}:{base}"] for base in BASELINES}} for metric in METRICS},
    }


def _mean_ci(values) -> list | None:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    a = a[np.isfinite(a)]
    if not a.size:
        return None
    m = float(a.mean())
    half = 1.96 * float(a.std(ddof=1)) / math.sqrt(a.size) if a.size > 1 else 0.0
    return [_r(m), _r(m - half), _r(m + half), int(a.size)]


def _layer_summary(layer: int, index: pl.DataFrame, chunk_size: int, src: LayerSource) -> dict:
    means = {}
    for metric in METRICS:
        means[metric] = {"explainer": _mean_ci(index[f"{metric}:v"].to_list()),
                         **{b: _mean_ci(index[f"{metric}:{b}"].to_list()) for b in BASELINES}}
    wins = {}
    for b in BASELINES:
        both = index.select(pl.col(f"{PRIMARY_METRIC}:v"), pl.col(f"{PRIMARY_METRIC}:{b}")).drop_nulls()
        wins[b] = _r(float((both[:, 0] > both[:, 1]).mean()), 3) if both.height else None
    scored = index.filter(pl.col(f"{PRIMARY_METRIC}:v").is_not_null())
    cols = ["unit", "polarity", "text", f"{PRIMARY_METRIC}:v", f"{PRIMARY_METRIC}:lo", f"{PRIMARY_METRIC}:hi"]

    def rows(df):
        return [{"u": r[0], "p": r[1], "t": r[2], "v": r[3], "lo": r[4], "hi": r[5]} for r in df.select(cols).rows()]

    ordered = scored.sort(f"{PRIMARY_METRIC}:v", descending=True)
    n_best = min(N_BEST, (ordered.height + 1) // 2)
    n_worst = min(N_BEST, ordered.height - n_best)
    return {
        "layer": layer, "n_units": index.height, "n_scored": scored.height,
        "chunk_size": chunk_size, "n_chunks": max(1, math.ceil(index.height / chunk_size)),
        "means": means, "llm_beats": wins,
        "best": rows(ordered.head(n_best)), "worst": rows(ordered.tail(n_worst).reverse()) if n_worst else [],
        "simulator": src.simulator, "has_records": src.records_dir is not None,
        "sources": {"scores": [str(d) for d in src.scores_dirs], "simulations": [str(d) for d in src.simulations_dirs],
                    "records": str(src.records_dir or "")},
        "plot": f"plots/layer_{layer}_scores.png",
    }


# ---------------------------------------------------------------- unit details


def _explanations_of(chosen: pl.DataFrame) -> dict[tuple[int, int], dict]:
    out: dict[tuple[int, int], dict] = {}
    cols = [c for c in ("unit", "polarity", "method", "explainer", "text", "candidates", "candidate_valid_scores")
            if c in chosen.columns]
    n = chosen.height
    data = {c: chosen.get_column(c).to_list() if c in cols else [None] * n
            for c in ("unit", "polarity", "method", "explainer", "text", "candidates", "candidate_valid_scores")}
    for i in range(n):
        key = (int(data["unit"][i]), int(data["polarity"][i]))
        method = data["method"][i]
        entry = {"text": data["text"][i] or "", "explainer": data["explainer"][i] or ""}
        if method == "explainer":
            cands = data["candidates"][i] or []
            vscores = data["candidate_valid_scores"][i] or []
            entry["candidates"] = [[c, _r(vscores[j]) if j < len(vscores) else None] for j, c in enumerate(cands)]
        out.setdefault(key, {}).setdefault(method, entry)
    return out


def _scores_of(scores: pl.DataFrame) -> dict[tuple[int, int], dict]:
    out: dict[tuple[int, int], dict] = {}
    rounded = [pl.col(c).cast(pl.Float64).fill_nan(None).round(4) for c in ("value", "ci_low", "ci_high")]
    cols = ["unit", "polarity", "method", "metric", "value", "ci_low", "ci_high", "undefined_reason", "n_records",
            "n_failed"]
    df = scores.with_columns(rounded).select(cols)
    for u, p, method, metric, v, lo, hi, why, n, nf in zip(*(df.get_column(c).to_list() for c in cols)):
        by_method = out.get((u, p))
        if by_method is None:
            by_method = out[(u, p)] = {}
        by_metric = by_method.get(method)
        if by_metric is None:
            by_metric = by_method[method] = {}
        by_metric[metric] = [v, lo, hi, why, n, nf]
    return out


def _sims_frame(src: LayerSource) -> pl.DataFrame | None:
    """The test-split simulations of a layer (the ones its scores come from), or None. Each row's
    expected activations come as the JSON text of the list, rounded to 2 decimals: formatting a
    layer's millions of floats in polars takes a fraction of what Python's json module needs."""
    paths = [d / f"layer_{src.layer}.parquet" for d in src.simulations_dirs]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        return None
    value = pl.element().cast(pl.Float64).round(2)
    as_json = pl.when(value.is_finite()).then(value.cast(pl.String)).otherwise(pl.lit("null"))
    cols = ["unit", "polarity", "method", "window_id", "split", "expected", "failure"]
    sims = pl.concat([pl.scan_parquet(p).select(cols).filter(pl.col("split") == "test") for p in paths]).collect()
    return sims.select(pl.col("unit").cast(pl.Int64), pl.col("polarity").cast(pl.Int64), "method", "window_id",
                       ("[" + pl.col("expected").list.eval(as_json).list.join(",") + "]").fill_null("null")
                       .alias("expected"), "failure")


def _sims_of(sims: pl.DataFrame | None, keys: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """For these units, the JSON text of window id -> {"sim": {method: expected}, "fail": {method:
    reason}}; the page puts each on its exemplar (simulations exist for the test-split windows,
    which are always shown). Expected is null where the simulation failed."""
    if sims is None or not keys:
        return {}
    wanted = pl.DataFrame(keys, schema={"unit": pl.Int64, "polarity": pl.Int64}, orient="row")
    part = sims.join(wanted, on=["unit", "polarity"], how="semi")
    windows: dict[tuple[int, int], dict[int, tuple[list[str], list[str]]]] = {}
    cols = ["unit", "polarity", "method", "window_id", "expected", "failure"]
    names = {m: _json(m) for m in part.get_column("method").unique().to_list()}
    for u, p, method, w, expected, failure in zip(*(part.get_column(c).to_list() for c in cols)):
        sim, fail = windows.setdefault((u, p), {}).setdefault(w, ([], []))
        sim.append(f"{names[method]}:{expected}")
        if failure:
            fail.append(f"{names[method]}:{_json(failure)}")
    return {key: "{" + ",".join(f'"{w}":{{"sim":{{{",".join(sim)}}}' + (f',"fail":{{{",".join(fail)}}}}}' if fail else "}")
                                for w, (sim, fail) in by_window.items()) + "}"
            for key, by_window in windows.items()}


def _top_tokens(records) -> list[list]:
    """Tokens with the highest activations over the top exemplars: [token, max, mean, count, peaks]."""
    tops = [r for r in records if r.kind == "top" and r.activations]
    if not tops:
        return []
    tokens, acts, peaks = [], [], []
    for r in tops:
        a = np.asarray(r.activations, dtype=float)
        n = min(len(r.tokens), a.size)
        tokens += r.tokens[:n]
        acts.append(a[:n])
        flags = np.zeros(n)
        if int(np.argmax(a)) < n:
            flags[int(np.argmax(a))] = 1
        peaks.append(flags)
    # Per distinct token at once; ties keep first-seen order.
    uniq, first, inv = np.unique(np.array(tokens, dtype=object).astype(str), return_index=True, return_inverse=True)
    acts_all = np.concatenate(acts)
    best = np.full(uniq.size, -np.inf)
    np.maximum.at(best, inv, acts_all)
    total, count = np.bincount(inv, acts_all, uniq.size), np.bincount(inv, minlength=uniq.size)
    peak = np.bincount(inv, np.concatenate(peaks), uniq.size)
    order = np.lexsort((first, -peak, -best))[:N_TOP_TOKENS]
    return [[tokens[first[i]], float(best[i]), float(total[i] / count[i]), int(count[i]), int(peak[i])] for i in order]


def _pick_records(records, max_per_kind: int | None):
    """Every quantile record, the strongest `max_per_kind` top and random ones, and all test-split ones."""
    kept, seen = [], {"top": 0, "random": 0}
    for r in records:
        if r.kind in seen and r.split != "test" and max_per_kind is not None:
            if seen[r.kind] >= max_per_kind:
                continue
            seen[r.kind] += 1
        kept.append(r)
    return kept


def _records_part(unit_records, max_per_kind) -> dict:
    """The part of a unit's page that its records alone decide: exemplars, statistics, top tokens.
    It does not change when the unit is re-simulated, so a rebuild reuses it (see _RecordsCache)."""
    part: dict[str, Any] = {"stats": None, "records": [], "top_tokens": [], "scale": None, "n_records": {}}
    if unit_records is None:
        return part
    records = unit_records.records
    top_max = [r.max_activation for r in records if r.kind == "top"]
    scale = max(top_max) if top_max else max((r.max_activation for r in records), default=0.0)
    st = unit_records.stats
    if st is not None:
        part["stats"] = {"mean": _finite(st.mean), "std": _finite(st.std), "max": _finite(st.max),
                         "frac_active": _finite(st.frac_active), "skewness": _finite(st.skewness),
                         "kurtosis": _finite(st.kurtosis),
                         "hist_edges": _rel_round(st.hist_edges, abs(st.max) or scale or 1.0),
                         "hist_counts": [int(c) for c in st.hist_counts]}
        if not scale or scale <= 0:
            scale = _finite(st.max) or 0.0
    ref = abs(scale) if scale else 1.0
    part["scale"] = _finite(scale)
    rank = {"top": 0, "quantile": 0, "random": 0}
    out = []
    picked = _pick_records(records, max_per_kind)
    for r, rounded in zip(picked, _rel_round_each([r.activations for r in picked], ref)):
        item = {"w": r.window_id, "k": r.kind, "s": r.split, "q": r.quantile_bin, "t": list(r.tokens),
                "a": rounded, "m": _finite(round(r.max_activation, 6))}
        item["i"] = rank.get(r.kind, 0)
        rank[r.kind] = item["i"] + 1
        out.append(item)
    part["records"] = out
    part["n_records"] = {k: sum(r.kind == k for r in records) for k in ("top", "quantile", "random")}
    part["top_tokens"] = [[t, _r(mx, 6), _r(mn, 6), n, pk] for t, mx, mn, n, pk in _top_tokens(records)]
    return part


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
        self.fragments[name] = _json(part)[1:-1]
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


def _records_reader(src: LayerSource):
    """A function (list of (unit, polarity)) -> {(unit, polarity): UnitRecords}, or None without records."""
    if src.records_dir is None:
        return None
    from autoexplain.activations import read_units

    m = read_manifest(src.records_dir)
    windows = src.records_dir.parent.parent / "windows" / m["inputs"]["windows"] / "windows.parquet"
    records_path = src.records_dir / f"layer_{src.layer}.records.parquet"
    stats_path = src.records_dir / f"layer_{src.layer}.stats.parquet"
    if not windows.is_file() or not records_path.is_file():
        return None

    def read(keys):
        found = read_units(records_path, windows, keys, stats_path if stats_path.is_file() else None)
        return {(u.neuron.index, u.neuron.polarity): u for u in found}

    return read


# ---------------------------------------------------------------- pages

_CSP = ("default-src 'self' file:; script-src 'self' file:; style-src 'self' file:; img-src 'self' file: data:; "
        "object-src 'none'; base-uri 'none'; form-action 'none'")


def _page(kind: str, title: str, body: str) -> str:
    t = html.escape(title)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>{t}</title>
<link rel="stylesheet" href="assets/viewer.css">
</head>
<body data-page="{kind}">
<header class="top"><a class="brand" href="index.html">{t}</a><nav id="crumbs"></nav></header>
<main>
{body}
</main>
<footer>Static site written by autoexplain. Scores are on the held-out test split; CIs are 95% bootstrap intervals over records.</footer>
<script src="data/site.js"></script>
<script src="assets/viewer.js"></script>
</body>
</html>
"""


_INDEX_BODY = """<h1>Neuron explanations</h1>
<p class="lede" id="overview"></p>
<section><h2>Layers</h2><table class="grid" id="layers"></table></section>
<section class="plots" id="plots"></section>
<section><h2>Search explanations</h2>
<div class="controls"><input id="search" type="search" placeholder="Search explanations in all layers" autocomplete="off" spellcheck="false"><span id="count" class="muted"></span></div>
<table class="grid" id="results"></table></section>"""

_LAYER_BODY = """<h1 id="title">Layer</h1>
<p class="lede" id="overview"></p>
<div class="cols">
<section><h2>Score distribution</h2><img id="hist" class="plot" alt="Histogram of unit scores"></section>
<section><h2>Best explained</h2><ol class="units" id="best"></ol><h2>Worst explained</h2><ol class="units" id="worst"></ol></section>
</div>
<section><h2>Units</h2>
<div class="controls">
<input id="search" type="search" placeholder="Filter by explanation text" autocomplete="off" spellcheck="false">
<label>Metric <select id="metric"></select></label>
<span id="count" class="muted"></span>
</div>
<table class="grid sortable" id="units"></table>
<div class="pager" id="pager"></div>
</section>"""

_UNIT_BODY = """<div class="unit-head"><h1 id="title">Unit</h1><nav id="unit-nav"></nav></div>
<section class="card"><div class="label">Explanation</div><p class="explanation" id="explanation"></p><p id="headline" class="muted"></p></section>
<div class="cols">
<section><h2>Candidates (best of k on the valid split)</h2><table class="grid" id="candidates"></table></section>
<section><h2>Explanation and baselines</h2><table class="grid" id="baselines"></table></section>
</div>
<section><h2>Test scores with 95% CIs</h2><table class="grid" id="scores"></table></section>
<div class="cols">
<section><h2>Activation histogram</h2><div id="histogram"></div><p class="muted" id="stats"></p></section>
<section><h2>Tokens it fires on most</h2><table class="grid" id="top-tokens"></table></section>
</div>
<section><h2>Real and simulated activations (test split)</h2>
<div class="controls"><label><input type="checkbox" id="overlay-toggle"> Overlay</label>
<label>Explanation <select id="sim-method"></select></label><span class="legend" id="sim-legend"></span></div>
<div id="simulations"></div></section>
<section><h2>Top-activating exemplars</h2><div id="ex-top" class="exemplars"></div></section>
<section><h2>Quantile exemplars</h2><div id="ex-quantile" class="exemplars"></div></section>
<section><h2>Random exemplars</h2><div id="ex-random" class="exemplars"></div></section>"""


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
        scores, chosen = _scores(src), _chosen(src)
        for name, table in (("scores", scores), ("chosen explanations", chosen)):
            found = set(table.get_column("layer").unique().to_list()) if "layer" in table.columns else set()
            if found - {src.layer}:
                raise UserError(f"the {name} of {src.scores_dirs[0]} hold rows of layer(s) {sorted(found)}, "
                                f"but its manifest says layer {src.layer}",
                                "rerun the explain, simulate and score stages for that layer")
        all_scores.append(scores)
        units = _unit_list(scores, chosen)
        index = _index_frame(units, scores, chosen)
        ldir = site_dir / "data" / f"L{src.layer}"
        if ldir.exists():
            shutil.rmtree(ldir)
        (ldir / "u").mkdir(parents=True)
        summary = _layer_summary(src.layer, index, chunk_size, src)
        summary["unit_block"] = unit_block or (1 if src.records_dir is not None else 100)
        if not plots:
            summary["plot"] = None
        for k in range(summary["n_chunks"]):
            _write_js(ldir / f"index_{k}.js", f"L{src.layer}/index/{k}",
                      _index_chunk(index.slice(k * chunk_size, chunk_size)))
        _write_js(ldir / "summary.js", f"L{src.layer}/summary", summary)
        _write_units(src, units, scores, chosen, site_dir, max_per_kind, summary["unit_block"])
        if plots:
            from autoexplain.plots import plot_score_distribution

            plot_score_distribution(scores, site_dir / summary["plot"])
        layers_meta.append({k: summary[k] for k in ("layer", "n_units", "n_scored", "n_chunks", "chunk_size",
                                                     "unit_block", "means", "llm_beats", "simulator",
                                                     "has_records")})

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
    _write_js(site_dir / "data" / "site.js", "site", site)
    for name, body in (("index", _INDEX_BODY), ("layer", _LAYER_BODY), ("unit", _UNIT_BODY)):
        (site_dir / f"{name}.html").write_text(_page(name, title, body), encoding="utf-8")
    return site_dir / "index.html"


def _write_units(src, units: pl.DataFrame, scores, chosen, site_dir: Path, max_per_kind, block: int) -> None:
    """One file per `block` neurons (both polarities): data/L<layer>/u/<unit // block>.js."""
    expl, sc, sims_frame = _explanations_of(chosen), _scores_of(scores), _sims_frame(src)
    reader = _records_reader(src)
    udir = site_dir / "data" / f"L{src.layer}" / "u"
    cache = _RecordsCache(site_dir, src, max_per_kind) if reader else None
    no_records = _json(_records_part(None, max_per_kind))[1:-1]
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
                cache.add(unit_name(u, p), _records_part(recs.get((u, p)), max_per_kind))
        sims = _sims_of(sims_frame, wanted)
        for x in batch:
            parts = []
            for u, p in groups[x]:
                j = position[(u, p)]
                detail = {"layer": L, "unit": u, "polarity": p, "explanations": expl.get((u, p)) or {},
                          "scores": sc.get((u, p)) or {},
                          "prev": unit_key(L, *keys[j - 1]) if j > 0 else None,
                          "next": unit_key(L, *keys[j + 1]) if j + 1 < len(keys) else None,
                          "other": unit_key(L, u, -p) if (u, -p) in position else None}
                records = cache.fragments[unit_name(u, p)] if cache is not None else no_records
                parts.append(f'{_json(unit_name(u, p))}:{{{_json(detail)[1:-1]},"sims":{sims.get((u, p), "{}")},{records}}}')
            text = _js_text(f"L{L}/u/{x}", "{" + ",".join(parts) + "}")
            (udir / f"{x}.js").write_bytes(text.encode("utf-8", errors="replace"))
        batch = []
    if cache is not None:
        cache.save()
