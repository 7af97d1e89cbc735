"""Hard negatives: held-out windows like a unit's activating ones, on which it does not fire.

Random non-activating windows are easy to tell from activating ones, so a classifier that merely
recognises the topic of the activating windows scores well on them (a recall bias). delphi also
draws negatives from similar contexts; so do we, per layer, once:

1. a pool of `pool` windows drawn (seeded) from the corpus windows that appear in no record of the
   units asked about: their explainer never saw them (it sees a unit's own train records only),
   and none of them is scored on them otherwise (a corpus with no such window gives no similar
   negatives: the scores then hold the random ones only);
2. the subject's activations on the pool, for every unit of the layer (one forward pass per batch:
   the records hold each unit's activations only on its own windows);
3. per unit and polarity, the pool windows on which it does not fire (every token below
   `classify.ACTIVE_FRACTION` of its top activation), ranked by MiniLM cosine similarity to the
   mean embedding of its test-split activating windows; the nearest `per_unit` are its 'similar'
   negatives;
4. per unit, its `PARTNERS` co-firing units (the highest correlation of per-window maxima, as
   shares of each unit's top activation, over the pool; another neuron, either polarity), and the
   pool windows where one of them fires and it does not, strongest first: its 'cofiring' negatives.

The output `negatives/<key>/layer_<L>.parquet` is keyed by the records, the subject's weights, the
parameters and the code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from autoexplain.classify import ACTIVE_FRACTION, SCORED_SPLIT
from autoexplain.errors import UserError
from autoexplain import layout
from autoexplain.records import ActivationRecord
from autoexplain.storage import read_manifest
from autoexplain.store import Stage
from autoexplain.schemas import load_schema

POOL, PER_UNIT, PARTNERS = 512, 10, 5


def _pool_ids(records: pl.DataFrame, units: list[tuple[int, int]], windows_path: Path, pool: int, seed: int) -> np.ndarray:
    wanted = pl.DataFrame(units, schema={"unit": pl.Int32, "polarity": pl.Int8}, orient="row")
    used = set(records.join(wanted, on=["unit", "polarity"], how="semi")["window_id"].to_list())
    ids = pl.scan_parquet(windows_path).select("window_id").collect()["window_id"].to_numpy()
    free = np.sort(ids[~np.isin(ids, list(used))])
    if free.size == 0:  # a corpus too small to hold windows beyond the records: no similar negatives
        return free
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.choice(free, size=min(pool, free.size), replace=False))


def _pool_maxima(subject, windows_path: Path, ids: np.ndarray, layer: int, source, batch: int = 32):
    """(tokens per window, max and -min of every unit of `source` per window: (P, U) each)."""
    import torch

    table = pl.scan_parquet(windows_path).filter(pl.col("window_id").is_in(ids.tolist())).select(
        "window_id", "token_ids", "tokens").collect().sort("window_id")
    token_ids, tokens = table["token_ids"].to_list(), table["tokens"].to_list()
    if not token_ids:
        return np.zeros(0, np.int64), [], np.zeros((0, 0)), np.zeros((0, 0))
    hi, lo = [], []
    with torch.no_grad():
        for s in range(0, len(token_ids), batch):
            acts = source.activations(subject, torch.tensor(token_ids[s : s + batch], dtype=torch.long), [layer])[layer]
            hi.append(acts.amax(dim=1).float().cpu().numpy())
            lo.append(acts.amin(dim=1).float().cpu().numpy())
    return table["window_id"].to_numpy(), tokens, np.concatenate(hi), -np.concatenate(lo)


def similar_negatives(records: pl.DataFrame, tokens_of: dict, pool_ids, pool_tokens, pool_max: dict[int, np.ndarray],
                      units: list[tuple[int, int]], per_unit: int) -> list[dict]:
    """The rows of step 3 (see the module docstring), for these (unit, polarity) pairs."""
    from autoexplain.score_embedding import embed, window_text

    pool_vecs = embed([window_text(t) for t in pool_tokens])
    rows = []
    for unit, polarity in units:
        mine = records.filter((pl.col("unit") == unit) & (pl.col("polarity") == polarity))
        tops = mine.filter(pl.col("kind") == "top")
        top = max((max(a) for a in tops["activations"].to_list()), default=0.0)
        test = tops.filter(pl.col("split") == SCORED_SPLIT)["window_id"].to_list()
        if top <= 0 or not test:
            continue
        centre = embed([window_text(tokens_of[w]) for w in sorted(test)]).mean(axis=0)
        quiet = np.flatnonzero(pool_max[polarity][:, unit] < ACTIVE_FRACTION * top)
        sims = pool_vecs[quiet] @ centre / max(float(np.linalg.norm(centre)), 1e-12)
        for rank, k in enumerate(np.argsort(-sims, kind="stable")[:per_unit]):
            i = int(quiet[k])
            rows.append({"unit": unit, "polarity": polarity, "kind": "similar", "window_id": int(pool_ids[i]), "rank": rank,
                         "similarity": float(sims[k]), "max_activation": float(pool_max[polarity][i, unit])})
    return rows


def cofiring_negatives(pool_ids, pool_max: dict[int, np.ndarray], tops: dict[tuple[int, int], float],
                       units: list[tuple[int, int]], per_unit: int, partners: int = PARTNERS) -> list[dict]:
    """Step 4 (see the module docstring): per unit, the pool windows where its co-firing units fire
    and it does not, strongest partner activation first."""
    cols = [(u, p) for (u, p), t in sorted(tops.items()) if t > 0]
    if not cols or len(pool_ids) < 3:
        return []
    z = np.stack([pool_max[p][:, u] / tops[(u, p)] for u, p in cols], axis=1)  # (P, units): share of each top
    zc = z - z.mean(axis=0)
    zc /= np.maximum(np.linalg.norm(zc, axis=0), 1e-12)
    index = {c: i for i, c in enumerate(cols)}
    rows = []
    for unit, polarity in units:
        i = index.get((unit, polarity))
        if i is None:
            continue
        corr = zc.T @ zc[:, i]
        corr[[j for j, (u, _) in enumerate(cols) if u == unit]] = -np.inf  # not itself, either polarity
        best = np.argsort(-corr, kind="stable")[:partners]
        partner = z[:, best].max(axis=1)
        quiet = np.flatnonzero((z[:, i] < ACTIVE_FRACTION) & (partner >= ACTIVE_FRACTION))
        for rank, k in enumerate(quiet[np.argsort(-partner[quiet], kind="stable")][:per_unit]):
            rows.append({"unit": unit, "polarity": polarity, "kind": "cofiring", "window_id": int(pool_ids[k]),
                         "rank": rank, "similarity": float(partner[k]),
                         "max_activation": float(pool_max[polarity][k, unit])})
    return rows


def check_model(records_dir, model: str) -> None:
    """`run_negatives`' refusal of another model than the records were made with, without loading it."""
    from autoexplain.subject import made_records

    subject_key = read_manifest(Path(records_dir))["inputs"].get("subject", "")
    if subject_key and not made_records(subject_key, model):
        raise _another_model(model, records_dir)


def _another_model(model: str, records_dir) -> UserError:
    return UserError(f"the model '{model}' is not the one {records_dir} was recorded with (changed since, or another)",
                     "use the model the records were made with, or record again")


def run_negatives(records_dir, layer: int, out, model: str, units: list[tuple[int, int]] | None = None,
                  pool: int = POOL, per_unit: int = PER_UNIT, seed: int = 0, source: str | None = None) -> Path:
    """The layer's similar negatives (see the module docstring); returns the stage folder.
    `source`: a coder's spec where it is now (`source_coder.recorded_source`)."""
    from autoexplain.layer import records_inputs
    from autoexplain.source_coder import recorded_source
    from autoexplain.subject import load_subject

    records_path, windows_path, records_key = records_inputs(Path(records_dir), layer)
    subject_key = read_manifest(Path(records_dir))["inputs"].get("subject", "")
    params = {"layer": layer, "units": sorted(units) if units else None, "pool": pool, "per_unit": per_unit,
              "seed": seed, "active_fraction": ACTIVE_FRACTION, "subject": subject_key}
    stage = Stage.open(out, "negatives", {"records": records_key, **params}, run_negatives)
    if stage.done:
        return stage.directory
    subject = load_subject(model)
    if subject_key and not subject.made(subject_key):
        raise _another_model(model, records_dir)
    records = pl.read_parquet(records_path, columns=["unit", "polarity", "window_id", "kind", "split", "activations"])
    wanted = units or sorted(set(zip(records["unit"].to_list(), records["polarity"].to_list())))
    ids = _pool_ids(records, wanted, windows_path, pool, seed)
    if ids.size == 0:
        wanted = []
    pool_ids, pool_tokens, hi, neg_lo = _pool_maxima(subject, windows_path, ids, layer,
                                                     recorded_source(records_dir, model, layer, source))
    test_ids = records.filter((pl.col("kind") == "top") & (pl.col("split") == SCORED_SPLIT))["window_id"].unique()
    tok = pl.scan_parquet(windows_path).filter(pl.col("window_id").is_in(test_ids.to_list())).select(
        "window_id", "tokens").collect()
    tokens_of = dict(zip(tok["window_id"].to_list(), tok["tokens"].to_list()))
    rows = similar_negatives(records, tokens_of, pool_ids, pool_tokens, {1: hi, -1: neg_lo}, wanted, per_unit)
    tops = {(u, p): max(max(a) for a in g["activations"].to_list())
            for (u, p), g in records.filter(pl.col("kind") == "top").group_by(["unit", "polarity"])}
    rows += cofiring_negatives(pool_ids, {1: hi, -1: neg_lo}, tops, wanted, per_unit)
    stage.table(pa.Table.from_pylist(rows, schema=load_schema("negatives")), layout.table(stage.directory, layer).name,
                "negatives")
    return stage.seal({"records": Path(records_dir)}, params)


def read_negatives(directory: Path, layer: int, windows_path: Path) -> dict[tuple[int, int], dict[str, list[ActivationRecord]]]:
    """Per (unit, polarity), its negatives of each kind ('similar', 'cofiring') as records (tokens
    only: no activation is scored)."""
    table = pl.read_parquet(layout.table(directory, layer)).sort(["unit", "polarity", "kind", "rank"])
    ids = table["window_id"].unique().to_list()
    tok = pl.scan_parquet(windows_path).filter(pl.col("window_id").is_in(ids)).select("window_id", "tokens").collect()
    tokens_of = dict(zip(tok["window_id"].to_list(), tok["tokens"].to_list()))
    out: dict[tuple[int, int], dict[str, list[ActivationRecord]]] = {}
    for r in table.iter_rows(named=True):
        out.setdefault((r["unit"], r["polarity"]), {}).setdefault(r["kind"], []).append(
            ActivationRecord(list(tokens_of[r["window_id"]]), [r["max_activation"]], r["window_id"], r["kind"], "held-out"))
    return out
