"""Report plots from a scores table (matplotlib, Agg backend), written as PNG files.

Each function takes the long-format scores table (`schemas/scores.json`: one row per unit,
polarity, method and metric) as a polars or pandas DataFrame or a pyarrow Table, and writes one PNG.
The neuron viewer embeds them; they also stand alone in reports.

Means over units carry a 95% CI from the normal approximation (mean +- 1.96 standard errors over
units); a unit's own CI (bootstrap over its records) is in the table, not in these summaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from autoexplain.pipeline import METHODS

DEFAULT_METRIC = "top_and_random"
COLORS = dict(zip(METHODS, ("#2463eb", "#e07b00", "#2a9d5c", "#8a8f98")))
METRIC_LABELS = {
    "top_and_random": "correlation score (top and random)",
    "random_only": "correlation score (random only)",
    "calibrated_r2": "calibrated R²",
    "calibrated_abs_dev_explained": "calibrated abs. deviation explained",
    "detection_auc": "detection AUC",
}


def pyplot():
    """matplotlib on the Agg backend, in the plots' style (also imported early by the flow's warm-up)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titlesize": 10, "figure.dpi": 110})
    return plt


def _frame(scores) -> pl.DataFrame:
    if isinstance(scores, pl.DataFrame):
        return scores
    if isinstance(scores, pa.Table):
        return pl.from_arrow(scores)
    return pl.from_pandas(scores)


def _values(df: pl.DataFrame, metric: str, method: str) -> np.ndarray:
    sel = df.filter((pl.col("metric") == metric) & (pl.col("method") == method)).get_column("value")
    return sel.drop_nulls().drop_nans().to_numpy().astype(float)


def mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    """`scoring.mean_ci` as floats for plotting: NaN where undefined (one value: a point, no bar)."""
    from autoexplain.scoring import mean_ci as interval

    m, lo, hi = interval(np.asarray(values, dtype=float).tolist())
    nan = float("nan")
    return (nan, nan, nan) if m is None else (m, m if lo is None else lo, m if hi is None else hi)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _layers(df: pl.DataFrame) -> list[int]:
    return sorted(int(x) for x in df.get_column("layer").unique().to_list())


def plot_score_distribution(scores, path, metric: str = DEFAULT_METRIC) -> Path:
    """Histogram of the per-unit score of the explanation and both baselines (one layer, or pooled)."""
    plt = pyplot()
    df = _frame(scores)
    layers = _layers(df) if df.height else []
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    all_vals = [_values(df, metric, m) for m in METHODS]
    pooled = np.concatenate([v for v in all_vals if v.size] or [np.zeros(0)])
    if pooled.size:
        lo, hi = float(pooled.min()), float(pooled.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
        for method, vals in zip(METHODS, all_vals):
            if not vals.size:
                continue
            m = vals.mean()
            label = f"{method} (n={vals.size}, mean {m:.3f})"
            if method == "explainer":
                ax.hist(vals, bins=bins, color=COLORS[method], alpha=0.55, label=label)
            else:
                ax.hist(vals, bins=bins, histtype="step", linewidth=1.6, color=COLORS[method], label=label)
            ax.axvline(m, color=COLORS[method], linestyle="--", linewidth=1)
        ax.legend(frameon=False, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no defined scores", ha="center", va="center", transform=ax.transAxes)
    where = f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers" if layers else "no units"
    ax.set_title(f"Score distribution, {where}")
    ax.set_xlabel(METRIC_LABELS.get(metric, metric))
    ax.set_ylabel("units")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def plot_mean_by_layer(scores, path, metric: str = DEFAULT_METRIC, units: str = "") -> Path:
    """Mean score per layer for the explanation and the baselines, with 95% CIs over units; `units`
    names whose units they are in the title (a site of neurons and latents plots each apart)."""
    plt = pyplot()
    df = _frame(scores)
    layers = _layers(df) if df.height else []
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for i, method in enumerate(METHODS):
        rows = [(L, *mean_ci(_values(df.filter(pl.col("layer") == L), metric, method))) for L in layers]
        rows = [r for r in rows if np.isfinite(r[1])]
        if not rows:
            continue
        x = np.array([r[0] for r in rows], dtype=float) + (i - (len(METHODS) - 1) / 2) * 0.08
        m = np.array([r[1] for r in rows])
        err = np.array([[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]])
        ax.errorbar(x, m, yerr=err, marker="o", markersize=4, capsize=3, linewidth=1.4,
                    color=COLORS[method], label=method)
    if layers:
        ax.legend(frameon=False, fontsize=8)
        ax.set_xticks(layers)
        ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)  # one layer: methods side by side, not across the axis
    else:
        ax.text(0.5, 0.5, "no defined scores", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0, color="#bbb", linewidth=0.8)
    ax.set_title(f"Mean score by layer{', ' + units if units else ''} (95% CI over units)")
    ax.set_xlabel("layer")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    return _save(fig, path)


def per_unit(scores, metric: str = DEFAULT_METRIC) -> pl.DataFrame:
    """One row per unit, a column of `metric` per method. A unit is its source's too: latent 5 of a
    layer's coder is not neuron 5 of that layer."""
    df = _frame(scores)
    if not df.height:
        return pl.DataFrame()
    unit = ["layer", "source", "unit", "polarity"] if "source" in df.columns else ["layer", "unit", "polarity"]
    return (df.filter(pl.col("metric") == metric)
            .select(*unit, "method", "value")
            .unique([*unit, "method"], keep="first", maintain_order=True)
            .pivot(on="method", index=unit, values="value"))


def plot_llm_vs_baselines(scores, path, metric: str = DEFAULT_METRIC) -> Path:
    """Per unit, the explanation's score against each baseline's; points above the diagonal beat it."""
    plt = pyplot()
    wide = per_unit(scores, metric)
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.6), sharey=True)
    # In the scores' order: translucent points blend in the order they are drawn, so an unordered
    # unique() would give the same scores different pixels from one build to the next.
    for ax, base in zip(axes, METHODS[1:]):
        if wide.height and "explainer" in wide.columns and base in wide.columns:
            pair = wide.select("explainer", base).drop_nulls().drop_nans()
            y, x = pair["explainer"].to_numpy().astype(float), pair[base].to_numpy().astype(float)
        else:
            x = y = np.zeros(0)
        if x.size:
            alpha = 0.7 if x.size < 500 else max(0.05, 300 / x.size)
            ax.scatter(x, y, s=8 if x.size < 2000 else 2, alpha=alpha, color=COLORS["explainer"], linewidths=0)
            lo = float(min(x.min(), y.min()))
            hi = float(max(x.max(), y.max()))
            ax.plot([lo, hi], [lo, hi], color="#999", linewidth=0.8, linestyle="--")
            wins = float(np.mean(y > x))
            ax.set_title(f"explainer vs {base}:\nexplainer higher on {wins:.0%} of {x.size} units", fontsize=9)
        else:
            ax.text(0.5, 0.5, "no units with both scores", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"explainer vs {base}", fontsize=9)
        ax.set_xlabel(f"{base} score")
    axes[0].set_ylabel(f"explainer score ({METRIC_LABELS.get(metric, metric)})")
    fig.tight_layout()
    return _save(fig, path)
