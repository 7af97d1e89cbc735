"""The viewer's data: the JSON that the site's pages read, built from a layer's tables.

Every value is made safe for a <script> (`to_json`), rounded to what a page can show, and written as
a script that assigns to `window.__data[key]` (`js_data`): see `autoexplain.view` for the layout.
- layer tables: one row per unit (explanation, every metric with its CI, the baselines), in chunks,
  and the layer's summary (means with CIs, best and worst units);
- unit details: explanations and candidates, scores, simulations and the records part (exemplars,
  statistics, top tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from autoexplain import layout
from autoexplain.pipeline import METHODS
from autoexplain.scoring import mean_ci_units
from autoexplain.view_sources import LayerSource

PRIMARY_METRIC = "top_and_random"
METRICS = ("top_and_random", "random_only", "calibrated_r2", "calibrated_abs_dev_explained", "detection_auc")
BASELINES = METHODS[1:]  # what the explanation is compared with, the shuffled control included
N_BEST = 10
N_TOP_TOKENS = 20


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


LEVELS = 1000  # an activation is shown to 1/LEVELS of its unit's scale: the tooltip's 3 digits


def quantise(rows: list, step: float) -> list[list]:
    """Activations as whole multiples of `step` (None where not finite), several lists in one numpy
    call: what the page shows (a colour and a 3-digit tooltip) in a few characters each."""
    if not rows:
        return []
    a = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in rows])
    ok = np.isfinite(a)
    q = np.where(ok, np.rint(np.where(ok, a, 0.0) / step), 0).astype(np.int64).tolist()
    if not ok.all():
        q = [v if k else None for v, k in zip(q, ok.tolist())]
    ends = np.cumsum([len(r) for r in rows]).tolist()
    return [q[s:e] for s, e in zip([0, *ends[:-1]], ends)]


def to_json(data: Any) -> str:
    """Compact JSON that is safe inside a <script>: no '<', '>', '&' or line separators."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (body.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def js_text(key: str, body: str) -> str:
    return f"(window.__data=window.__data||{{}})[{json.dumps(key)}]={body};\n"


def js_data(key: str, data: Any) -> str:
    """A script that stores `data` at `window.__data[key]`; safe to load with <script src>."""
    return js_text(key, to_json(data))


def js_bytes(key: str, data: Any) -> bytes:
    return js_data(key, data).encode("utf-8", errors="replace")


def write_js(path: Path, key: str, data: Any) -> int:
    text = js_bytes(key, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    return len(text)


def unit_page(source: str, unit: int, polarity: int, polar: bool) -> str:
    """A unit's name in the site, after '#' in unit.html links: 'L15/mlp/N1234+' for a neuron read with
    one of its two polarities, 'L15/sae-res-16k/N1234' for a unit of a one-signed source. The one
    place this name is made (viewer.js parses it back: `parseUnit`)."""
    return f"{source}/N{unit}{_marker(polarity, polar)}"


def unit_file(source: str, unit: int, polarity: int, polar: bool) -> str:
    """The unit's data file, relative to the site: 'data/L15/mlp/u/1234p.js' (the sign as a letter,
    so that no URL encoding can change the name). viewer.js derives the same path: `unitFile`."""
    return f"data/{source}/u/{unit}{ {'+': 'p', '-': 'n', '': ''}[_marker(polarity, polar)] }.js"


def _marker(polarity: int, polar: bool) -> str:
    return ("+" if polarity > 0 else "-") if polar or polarity < 0 else ""


def unit_name(unit: int, polarity: int) -> str:
    """A unit's key inside one source's tables (records cache, index rows)."""
    return f"{unit}{'+' if polarity > 0 else '-'}"


# ---------------------------------------------------------------- layer tables


def unit_list(scores: pl.DataFrame, chosen: pl.DataFrame) -> pl.DataFrame:
    keys = pl.concat([scores.select(pl.col("unit").cast(pl.Int64), pl.col("polarity").cast(pl.Int64)),
                      chosen.select(pl.col("unit").cast(pl.Int64), pl.col("polarity").cast(pl.Int64))])
    return keys.unique().sort(["unit", "polarity"], descending=[False, True])


def index_frame(units: pl.DataFrame, scores: pl.DataFrame, chosen: pl.DataFrame) -> pl.DataFrame:
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
    # As the scores hold them: the layer's means are `scoring`'s over these; what is written is rounded.
    num = [c for c in df.columns if ":" in c]
    return df.with_columns([pl.col(c).cast(pl.Float64).fill_nan(None) for c in num])


def index_chunk(df: pl.DataFrame) -> dict:
    df = df.with_columns([pl.col(c).round(4) for c in df.columns if ":" in c])  # what a page shows
    cols = {c: df.get_column(c).to_list() for c in df.columns}
    return {
        "u": cols["unit"], "p": cols["polarity"], "t": cols["text"],
        "m": {metric: {"v": cols[f"{metric}:v"], "lo": cols[f"{metric}:lo"], "hi": cols[f"{metric}:hi"],
                       **{base: cols[f"{metric}:{base}"] for base in BASELINES}} for metric in METRICS},
    }


def _mean_ci(values) -> list | None:
    """[mean, low, high, units] (`scoring.mean_ci_units`, shown to 4 digits; the bounds null for
    one unit), or None."""
    m, lo, hi, n = mean_ci_units(values)
    return None if m is None else [_r(m), _r(lo), _r(hi), n]


def layer_summary(src: LayerSource, index: pl.DataFrame, chunk_size: int, polar: bool) -> dict:
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
        return [{"u": r[0], "p": r[1], "n": unit_page(src.source, r[0], r[1], polar), "t": r[2], "v": _r(r[3]),
                 "lo": _r(r[4]), "hi": _r(r[5])} for r in df.select(cols).rows()]

    ordered = scored.sort(f"{PRIMARY_METRIC}:v", descending=True)
    n_best = min(N_BEST, (ordered.height + 1) // 2)
    n_worst = min(N_BEST, ordered.height - n_best)
    return {
        "layer": src.layer, "source": src.source, "kind": src.source.split("/", 1)[1], "polar": polar,
        "n_units": index.height, "n_scored": scored.height,
        "chunk_size": chunk_size, "n_chunks": max(1, math.ceil(index.height / chunk_size)),
        "means": means, "llm_beats": wins,
        "best": rows(ordered.head(n_best)), "worst": rows(ordered.tail(n_worst).reverse()) if n_worst else [],
        "simulator": src.simulator, "has_records": src.records_dir is not None,
        "sources": {"scores": [_named(d) for d in src.scores_dirs], "simulations": [_named(d) for d in src.simulations_dirs],
                    "records": _named(src.records_dir) if src.records_dir else ""},
        "plot": f"plots/{src.source.replace('/', '_')}_scores.png",
    }


def _named(stage_folder: Path) -> str:
    """A stage output as the site names it: `<stage>/<key>` in its output root, which may move (and
    whose place on this machine is no business of a published site's readers)."""
    return layout.within(layout.root_of(stage_folder), stage_folder)


HIST_EDGES = np.linspace(-1.0, 1.0, 21)  # the overview's score distributions: 20 bins over a correlation's range


def score_histogram(index: pl.DataFrame) -> dict:
    """Counts of the headline score in HIST_EDGES' bins, for the explanation and each baseline."""
    out = {"edges": [round(float(e), 2) for e in HIST_EDGES]}
    for method, col in (("explainer", f"{PRIMARY_METRIC}:v"), *((b, f"{PRIMARY_METRIC}:{b}") for b in BASELINES)):
        v = index[col].drop_nulls().to_numpy()
        out[method] = np.histogram(np.clip(v, -1.0, 1.0), HIST_EDGES)[0].astype(int).tolist()
    return out


# ---------------------------------------------------------------- unit details


def explanations_of(chosen: pl.DataFrame) -> dict[tuple[int, int], dict]:
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


def scores_of(scores: pl.DataFrame) -> dict[tuple[int, int], dict]:
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


def _expected_json() -> pl.Expr:
    """A row's expected activations as the JSON text of the list, in whole hundredths (the page
    divides by 100): formatting a layer's millions of numbers in polars takes a fraction of what
    Python's json module needs, and integers are what the page's 2 decimals need."""
    value = (pl.element().cast(pl.Float64) * 100).round(0)
    whole = pl.when(value.is_finite()).then(value).cast(pl.Int64, strict=False)  # NaN and inf: null
    as_json = whole.cast(pl.String).fill_null(pl.lit("null"))
    return ("[" + pl.col("expected").list.eval(as_json).list.join(",") + "]").fill_null("null")


def sims_of(sims: pl.DataFrame | None, keys: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """For these units, the JSON text of window id -> {"sim": {method: expected}, "fail": {method:
    reason}}; the page puts each on its exemplar (simulations exist for the test-split windows,
    which are always shown). Expected is null where the simulation failed. Windows and methods in
    the order of the rows of `sims` (`view_sources.sims_frame`); the text is put together in polars
    (a layer's rows are a quarter million)."""
    if sims is None or not keys:
        return {}
    on = ["unit", "polarity"]
    wanted = pl.DataFrame(keys, schema={"unit": pl.Int64, "polarity": pl.Int64}, orient="row")
    part = sims.join(wanted, on=on, how="semi", maintain_order="left").with_columns(_expected_json().alias("expected"))
    as_json = {c: {x: to_json(x) for x in part.get_column(c).drop_nulls().unique().to_list()} for c in ("method", "failure")}
    method = pl.col("method").replace_strict(as_json["method"], return_dtype=pl.String)
    failure = pl.col("failure").replace_strict(as_json["failure"], default=None, return_dtype=pl.String)
    windows = (part.group_by(*on, "window_id", maintain_order=True)
               .agg((method + ":" + pl.col("expected")).str.join(",").alias("sim"),
                    pl.when(pl.col("failure") != "").then(method + ":" + failure).str.join(",").alias("fail")))
    text = ('"' + pl.col("window_id").cast(pl.String) + '":{"sim":{' + pl.col("sim") + "}"
            + pl.when(pl.col("fail") != "").then(',"fail":{' + pl.col("fail") + "}}").otherwise(pl.lit("}")))
    units = windows.group_by(*on, maintain_order=True).agg(text.str.join(","))
    return {(u, p): "{" + t + "}" for u, p, t in units.iter_rows()}


def sims_digests(sims: pl.DataFrame | None) -> dict[tuple[int, int], int]:
    """A hash of each unit's rows of `sims`, in their order: equal hashes, equal `sims_of` text.
    Polars promises the same hash only within one release: a build keys what it keeps of them by
    the polars version (`view_written`)."""
    if sims is None or sims.height == 0:
        return {}
    rows = sims.with_columns(h=sims.hash_rows()).group_by("unit", "polarity", maintain_order=True).agg("h")
    return dict(zip(zip(rows["unit"].to_list(), rows["polarity"].to_list()), rows.select("h").hash_rows().to_list()))


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


def records_part(unit_records, max_per_kind) -> dict:
    """The part of a unit's page that its records alone decide: exemplars, statistics, top tokens.
    It does not change when the unit is re-simulated, so a rebuild reuses it (see `autoexplain.view._RecordsCache`)."""
    part: dict[str, Any] = {"stats": None, "records": [], "top_tokens": [], "scale": None, "step": None, "n_records": {}}
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
        if st.promotes:  # what it writes: tokens with their logits (no final norm), and the normed lists
            part["outputs"] = {"promotes": [[t, round(v, 3)] for t, v in zip(st.promotes, st.promotes_logits or [])],
                               "suppresses": [[t, round(v, 3)] for t, v in zip(st.suppresses or [], st.suppresses_logits or [])],
                               "promotes_normed": st.promotes_normed, "suppresses_normed": st.suppresses_normed}
        if not scale or scale <= 0:
            scale = _finite(st.max) or 0.0
    ref = abs(scale) if scale else 1.0
    part["scale"] = _finite(scale)
    part["step"] = ref / LEVELS  # activations below are multiples of it
    rank = {"top": 0, "quantile": 0, "random": 0}
    out = []
    picked = _pick_records(records, max_per_kind)
    for r, q in zip(picked, quantise([r.activations for r in picked], part["step"])):
        item = {"w": r.window_id, "k": r.kind, "s": r.split, "q": r.quantile_bin, "t": list(r.tokens),
                "a": q, "m": _finite(round(r.max_activation, 6))}
        item["i"] = rank.get(r.kind, 0)
        rank[r.kind] = item["i"] + 1
        out.append(item)
    part["records"] = out
    part["n_records"] = {k: sum(r.kind == k for r in records) for k in ("top", "quantile", "random")}
    part["top_tokens"] = [[t, _r(mx, 6), _r(mn, 6), n, pk] for t, mx, mn, n, pk in _top_tokens(records)]
    return part
