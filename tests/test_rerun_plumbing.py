"""The rerun path's cheaper plumbing gives the very bits of the plain one it replaced: pooled
scoring against per-record arrays, costs added as a running total, simulation rows read as float64
views, window maxima taken pooled; and the collector pause restores the collector."""

from __future__ import annotations

import gc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoexplain import collector, prices, scoring
from autoexplain.rows import TableRows, assemble, part_values, rows_to_table, stamped, table_rows
from autoexplain.score_simulation import _window_max


def _records(rng, n=30):
    out = []
    for i in range(n):
        size = int(rng.integers(1, 40))
        true = rng.standard_normal(size).astype(np.float32).astype(float).tolist()
        pred = (rng.random(size) * 10).tolist()
        out.append(scoring.ScoringRecord(true, pred, ("top", "random")[i % 2], ("test", "calib")[i % 3 == 0]))
    return out


def test_pooled_scores_equal_scores_of_per_record_arrays():
    rng = np.random.default_rng(3)
    as_lists = _records(rng)
    as_arrays = [scoring.ScoringRecord(np.asarray(r.true), np.asarray(r.expected), r.kind, r.split) for r in as_lists]
    pooled = scoring.score_unit(as_lists, split="test", n_boot=200, seed=5)
    assert pooled == scoring.score_unit(as_arrays, split="test", n_boot=200, seed=5)
    # ... and its interval is the public per-record bootstrap's (stretched to hold the value)
    kept = [r for r in as_lists if r.split == "test"]
    lo, hi = scoring.bootstrap_ci(scoring.correlation, [r.true for r in kept], [r.expected for r in kept], n_boot=200, seed=5)
    got = pooled[scoring.TOP_AND_RANDOM]
    assert (got.ci_low, got.ci_high) == (min(lo, got.value), max(hi, got.value))


def test_a_running_total_with_plus_is_the_fold_of_add():
    rng = np.random.default_rng(0)
    amounts = [float(x) for x in rng.standard_normal(500) * 1e-3] + [-0.0, 0.0, 1e-300, -1e-300]
    slow = fast = 0.0
    for a in amounts:
        slow, fast = prices.add(slow, a), prices.plus(fast, a)
        assert np.float64(slow).tobytes() == np.float64(fast).tobytes()
    assert prices.plus(fast, None) is None and prices.plus(None, 1.0) is None


def test_table_rows_hold_the_values_to_pylist_gives():
    expected = pa.array([[0.1, 2.5], None, [], [3.0]], pa.list_(pa.float32()))
    table = pa.table({"unit": [1, 1, 2, 2], "expected": expected}).slice(1)
    for fast, plain in zip(table_rows(table), table.to_pylist(), strict=True):
        assert fast["unit"] == plain["unit"]
        if plain["expected"] is None:
            assert fast["expected"] is None
        else:
            assert np.asarray(plain["expected"], dtype=np.float64).tobytes() == fast["expected"].tobytes()
    torn = pa.table({"expected": pa.array([[1.0, None]], pa.list_(pa.float32()))})
    assert table_rows(torn) == torn.to_pylist(), "a null inside a list is kept as to_pylist keeps it"


def test_a_table_from_arrays_is_the_table_from_lists():
    rng = np.random.default_rng(0)
    lists = [None if i % 7 == 3 else [float(x) for x in rng.standard_normal(i % 5) * 4] for i in range(40)]
    rows = [{"layer": 1, "unit": i // 4, "polarity": 1, "method": "explainer", "simulator": "s", "prompt_hash": "p",
             "window_id": i, "kind": "top", "split": "test", "expected": e, "failure": None if e else "x",
             "tokens": 0, "dollars": None} for i, e in enumerate(lists)]
    plain = rows_to_table(rows, "simulations")
    arrays = [{**r, "expected": None if r["expected"] is None else np.asarray(r["expected"])} for r in rows]
    mixed = [a if i % 2 else r for i, (a, r) in enumerate(zip(arrays, rows))]
    for other in (arrays, mixed, table_rows(plain)):
        got = rows_to_table(other, "simulations")
        assert got.schema == plain.schema and got.equals(plain)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("source", [None, "sae"])
def test_rows_read_back_as_arrow_slices_assemble_to_the_table_of_the_same_rows(tmp_path, source):
    """A rerun's simulate stage builds its table from units read back as slices of a sealed table
    (restamped with the new prompt's hash) between units computed as dicts: the file is the one
    the same rows as dicts give."""
    rng = np.random.default_rng(1)
    rows = [{"layer": 1, "unit": i // 3, "polarity": 1 - 2 * (i % 2), "method": ("explainer", "shuffled")[i % 3 == 2],
             "simulator": "s", "prompt_hash": "old", "window_id": i, "kind": "top", "split": "test",
             "expected": None if i % 11 == 5 else [float(x) for x in rng.standard_normal(i % 6) * 3],
             "failure": "x" if i % 11 == 5 else None, "tokens": i, "dollars": None if i % 4 else 0.5,
             **({"source": source} if source else {})} for i in range(60)]
    pq.write_table(rows_to_table(rows, "simulations"), tmp_path / "sealed.parquet")
    sealed = pq.read_table(tmp_path / "sealed.parquet")
    want = [{**r, "prompt_hash": "new"} for r in rows]
    # Read back: every third block of rows, two blocks out of order, a block with a gap inside.
    blocks = [list(range(a, min(a + 7, 60))) for a in range(0, 60, 7)]
    blocks[1] = blocks[1][:3] + blocks[1][5:]
    order = [blocks[0], blocks[3], blocks[2], blocks[1]] + blocks[4:]
    parts, expected = [], []
    for n, block in enumerate(order):
        if n % 3 == 1:
            parts.append([want[i] for i in block])  # computed now
        else:
            parts.append(stamped(TableRows(sealed, np.asarray(block)), "prompt_hash", "new"))
        parts.append([])  # a unit with no rows
        expected += [want[i] for i in block]
    plain = rows_to_table(expected, "simulations")
    got = assemble(parts, "simulations")
    assert got.schema == plain.schema and got.equals(plain)
    assert _parquet_bytes(got) == _parquet_bytes(plain)
    assert part_values(parts, "window_id") == [r["window_id"] for r in expected]
    assert set(part_values(parts, "prompt_hash")) == {"new"}
    assert assemble([[]], "simulations").equals(rows_to_table([], "simulations"))
    if source:  # a neuron table's parts beside an SAE's: every row carries its source, as from dicts
        mixed = [[{k: v for k, v in r.items() if k != "source"} for r in want[:5]], TableRows(sealed, np.arange(5, 9))]
        both = [{k: v for k, v in r.items() if k != "source"} for r in want[:5]] + rows[5:9]
        assert assemble(mixed, "simulations").equals(rows_to_table(both, "simulations"))


def test_window_maxima_pooled_are_each_windows_max():
    windows = [[0.5, 9.0, 1.0], [2.0], [float("nan"), 1.0], [3.0, 3.0]]
    want = [float(np.max(w)) for w in windows]
    for given in (windows, [np.asarray(w) for w in windows]):
        got = _window_max(given)
        assert np.asarray(want).tobytes() == got.tobytes()


def test_the_collector_resumes_after_the_last_pause():
    assert gc.isenabled()
    with collector.paused():
        with collector.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector.paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
