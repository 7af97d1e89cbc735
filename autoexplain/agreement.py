"""Agreement between scoring instruments across the units of a layer, as delphi reports it.

Per unit, each instrument's headline value for the explainer's explanation:
- simulation: the top-and-random correlation;
- detection, fuzzing: balanced accuracy with random negatives; fuzzing-active: with active ones;
- intruder: its accuracy (needs no explanation); embedding: its ROC AUC.
Then the Spearman rank correlation between pairs of instruments over the units that have both
(simulation-detection, simulation-fuzzing and fuzzing-intruder first), each classifier's value
pooled over the layer's trials (one confusion matrix for every unit, delphi's way), and each
scorer's tokens per unit. `agreement_markdown` writes it for the run's report, and a scatter plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

HEADLINE = {"simulation": "top_and_random", "detection": "detection_balanced_accuracy@random",
            "fuzzing": "fuzzing_balanced_accuracy@random", "fuzzing-active": "fuzzing_balanced_accuracy@active",
            "intruder": "intruder_accuracy@random", "embedding": "embedding_auc@random"}
PAIRS = [("simulation", "detection"), ("simulation", "fuzzing"), ("fuzzing", "intruder"),
         ("detection", "fuzzing"), ("simulation", "embedding"), ("simulation", "intruder"),
         ("fuzzing", "fuzzing-active")]


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson correlation of the ranks); None for fewer than 3 points or a constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def instrument(simulator: str, metric: str) -> str | None:
    """Which instrument a score row belongs to, if it is that instrument's headline metric."""
    kind = simulator.partition(":")[0]
    if metric == HEADLINE["simulation"]:
        return "simulation"
    return kind if HEADLINE.get(kind) == metric else None


def per_unit(scores: pl.DataFrame, method: str = "explainer") -> pl.DataFrame:
    """One row per unit (layer, unit, polarity), one column per instrument's headline value."""
    rows = scores.filter((pl.col("method") == method) & pl.col("value").is_not_null())
    rows = rows.with_columns(pl.struct("simulator", "metric").map_elements(
        lambda r: instrument(r["simulator"], r["metric"]), return_dtype=pl.String).alias("instrument"))
    rows = rows.filter(pl.col("instrument").is_not_null())
    if rows.height == 0:
        return pl.DataFrame()
    return rows.pivot(on="instrument", index=["layer", "unit", "polarity"], values="value", aggregate_function="first")


def agreement(table: pl.DataFrame) -> list[tuple[str, str, float | None, int]]:
    """(a, b, Spearman, units) for each pair of instruments the table has."""
    out = []
    for a, b in PAIRS:
        if a in table.columns and b in table.columns:
            both = table.select(a, b).drop_nulls()
            out.append((a, b, spearman(both[a].to_numpy(), both[b].to_numpy()), both.height))
    return out


def pooled_table(trials: pl.DataFrame | None, n_boot: int = 1000) -> list[tuple[str, str, str, object]]:
    """(scorer, method, metric, Score) pooled over every unit's trials."""
    from autoexplain.classify import Trial
    from autoexplain.classify_metrics import pooled
    from autoexplain.registry import parse_scorer

    if trials is None or trials.height == 0:
        return []
    out = []
    for (spec, method), group in trials.group_by(["scorer", "method"], maintain_order=True):
        typed = [Trial.of_row(r) for r in group.iter_rows(named=True)]
        cls = parse_scorer(spec).cls
        for name, s in pooled(cls.metric, typed, n_boot, 0, cls.metric_prefix).items():
            out.append((spec, method, name, s))
    return out


def cost_per_unit(scores: pl.DataFrame, trials: pl.DataFrame | None) -> dict[str, tuple[float, float | None]]:
    """Mean scorer (tokens, dollars) per unit: a classifier's from its trials (every method), the
    simulation's from its score rows (best-of-k's selection and the simulations scored, every
    method; its dollars include the explanation's). Dollars None: a model with no known price."""
    units = scores.select("layer", "unit", "polarity").unique().height or 1
    out = {}
    sims = scores.filter(pl.col("metric") == HEADLINE["simulation"])
    for (spec,), g in sims.group_by(["simulator"]):
        dollars = None if g["dollars"].null_count() else g["dollars"].sum() / units
        out[f"simulation ({spec})"] = (g["simulator_tokens"].sum() / units, dollars)
    if trials is not None:
        for (spec,), g in trials.group_by(["scorer"]):
            out[spec] = (g["tokens"].sum() / units, None if g["dollars"].null_count() else g["dollars"].sum() / units)
    return out


def scatter(table: pl.DataFrame, path: Path) -> Path | None:
    """One panel per pair of instruments present, a point per unit."""
    from autoexplain.plots import pyplot

    pairs = [(a, b) for a, b in PAIRS[:3] + PAIRS[3:] if a in table.columns and b in table.columns]
    if not pairs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.2), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        both = table.select(a, b).drop_nulls()
        rho = spearman(both[a].to_numpy(), both[b].to_numpy())
        ax.scatter(both[a].to_numpy(), both[b].to_numpy(), s=8, alpha=0.6)
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.set_title(f"rho = {rho:.2f} (n={both.height})" if rho is not None else f"n={both.height}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load(score_paths: Sequence[Path]) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """The scores tables and every trial behind them."""
    from autoexplain.classify_stage import read_trials

    scores = pl.concat([pl.read_parquet(p) for p in score_paths], how="vertical_relaxed")
    trials = [t for p in score_paths if (t := read_trials(Path(p).parent)) is not None]
    return scores, (pl.concat([pl.from_arrow(t) for t in trials], how="vertical_relaxed") if trials else None)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def agreement_markdown(score_paths: Sequence[Path], plot: Path | None = None, n_boot: int = 1000) -> str | None:
    """The report section; None when the scores hold a single instrument."""
    scores, trials = load(score_paths)
    table = per_unit(scores)
    if trials is None and scores.select("simulator").unique().height < 2:
        return None
    lines = ["## Agreement between scorers", "",
             "Spearman's rho across units of each instrument's headline value for the explainer's explanation.", "",
             "| instruments | Spearman rho | units |", "|---|---|---|"]
    lines += [f"| {a} vs {b} | {_fmt(rho)} | {n} |" for a, b, rho, n in agreement(table)]
    lines += ["", "## Classifier scores pooled over the layer's trials", "",
              "| scorer | method | metric | value | 95% CI | trials | failed |", "|---|---|---|---|---|---|---|"]
    for spec, method, name, s in pooled_table(trials, n_boot):
        ci = f"{_fmt(s.ci_low)}-{_fmt(s.ci_high)}" if s.ci_low is not None else "n/a"
        lines.append(f"| {spec} | {method} | {name} | {_fmt(s.value)} | {ci} | {s.n_records} | {s.n_failed} |")
    lines += ["", "## Scorer cost per unit", "", "| scorer | tokens per unit | dollars per unit |", "|---|---|---|"]
    lines += [f"| {k} | {t:,.0f} | {'no known price' if d is None else f'${d:.6f}'} |"
              for k, (t, d) in cost_per_unit(scores, trials).items()]
    if plot is not None and scatter(table, plot) is not None:
        lines += ["", f"Scatter plot: {plot}"]
    return "\n".join(lines) + "\n"


def write_page(markdown: str, folder: Path) -> Path:
    """`agreement.md` and a plain `agreement.html` showing it with the scatter plot, in `folder`."""
    import html

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "agreement.md").write_text(markdown, encoding="utf-8")
    img = '<img src="agreement.png" alt="scatter plots of the scorers across units">' if (folder / "agreement.png").is_file() else ""
    page = (f"<!doctype html><meta charset='utf-8'><title>Agreement between scorers</title><link rel='icon' href='data:,'>"
            f"<body style='font-family:sans-serif;max-width:70em;margin:2em auto'>{img}<pre>{html.escape(markdown)}</pre>")
    path = folder / "agreement.html"
    path.write_text(page, encoding="utf-8")
    return path
