"""Splits are of documents, as in the paper: every window is in its document's split, for every
unit, kind and layer, so the documents an explainer reads never score its explanation."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from autoexplain import pipeline
from autoexplain.errors import UserError
from autoexplain.explain_embedding import EmbeddingExplainer
from autoexplain.record import build_windows
from autoexplain.records import SPLITS, ActivationRecord, UnitId, UnitRecords
from autoexplain.registry import make_simulator
from autoexplain.rows import ExplanationRow, SimulationRow, from_table
from schemas.contracts import validate
from autoexplain.score_simulation import SimulationScorer
from autoexplain.splits import RandomPicker, check_random_room, document_splits
from autoexplain.subject import load_subject


def test_documents_are_dealt_whole_and_the_splits_hold_about_as_many_windows():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 60, size=300)  # windows per document, as uneven as real corpora
    doc_ids = rng.permutation(np.repeat(np.arange(300) * 7 + 3, sizes))  # ids need not be 0..n-1
    split = document_splits(doc_ids, seed=5)
    per_doc = pl.DataFrame({"doc": doc_ids, "split": split}).group_by("doc").agg(pl.col("split").n_unique())
    assert (per_doc["split"] == 1).all(), "a document in two splits"
    held = np.bincount(split, minlength=len(SPLITS))
    assert held.max() - held.min() <= sizes.max(), held  # the greedy dealing keeps them level
    assert (document_splits(doc_ids, seed=5) == split).all()
    assert (document_splits(doc_ids, seed=6) != split).any()


def test_random_windows_come_from_scoring_documents_and_a_short_split_is_made_up():
    window_split = np.array([0, 1, 2, 3] * 10 + [1, 1, 3, 3, 3, 3], dtype=np.int8)  # calib 12, valid 10, test 14
    order = np.random.default_rng(0).permutation(len(window_split))
    picker = RandomPicker(order, window_split, 9)
    fine = picker(set())  # 3 of each
    assert [s for s, _ in fine] == ["calib", "valid", "test"] * 3
    assert all(SPLITS[window_split[w]] == s for s, w in fine)
    assert [w for _, w in fine[::3]] == [int(w) for w in order if window_split[w] == 1][:3], "in the reservoir's order"
    valid = {int(w) for w in np.flatnonzero(window_split == 2)}
    short = picker(set(list(valid)[:-1]))  # the unit's top windows hold all but one valid window
    assert len(short) == 9 and sum(s == "valid" for s, _ in short) == 1
    assert not {w for _, w in short} & set(list(valid)[:-1]) and len({w for _, w in short}) == 9
    check_random_room(window_split, order, top_k=12, n_random=9)  # 36 scoring windows - 9 top >= 9
    with pytest.raises(UserError, match="holds 36 windows of calib/valid/test documents"):
        check_random_room(window_split, order, top_k=12, n_random=28)


def test_a_recording_keeps_each_document_in_one_split(tiny_records):
    """Old code dealt windows: the windows of one document fell in every split."""
    records_dir, out = tiny_records
    windows = pl.read_parquet(next(out.glob("windows/*/windows.parquet")), columns=["window_id", "doc_id"])
    recs = pl.read_parquet(next(records_dir.glob("*.records.parquet")), columns=["unit", "polarity", "kind", "split", "window_id"])
    joined = recs.join(windows, on="window_id")
    assert joined.height == recs.height
    per_doc = joined.group_by("doc_id").agg(pl.col("split").n_unique().alias("n"), pl.col("split").first())
    assert per_doc["n"].max() == 1, per_doc.filter(pl.col("n") > 1)
    # every split has documents, and random windows come from the three scoring splits only
    assert set(per_doc["split"]) == set(SPLITS)
    assert set(joined.filter(pl.col("kind") == "random")["split"]) == {"calib", "valid", "test"}
    # a unit's top records come from all four splits' documents, a quarter of them each
    top = joined.filter((pl.col("kind") == "top") & (pl.col("unit") == 0) & (pl.col("polarity") == 1))
    top = top.group_by("split").len()
    assert sorted(top["len"].to_list()) == [3, 3, 3, 3]


def test_the_records_contract_refuses_a_window_in_two_splits(tiny_records):
    records_dir, _ = tiny_records
    recs = pl.read_parquet(next(records_dir.glob("*.records.parquet")))
    params = {"window_len": 8, "max_exemplars": 12, "min_random": 0}
    assert validate(recs.to_arrow(), "records", params).success
    # a window that units 0 and 1 both hold, put in another scoring split for unit 1 only
    w, polarity, split = recs.filter(pl.col("unit") == 0).join(recs.filter(pl.col("unit") == 1),
                                                               on=["window_id", "polarity"]).select(
        "window_id", "polarity", "split").row(0)
    other = next(s for s in ("calib", "valid", "test") if s != split)
    at = (pl.col("window_id") == w) & (pl.col("unit") == 1) & (pl.col("polarity") == polarity)
    moved = recs.with_columns(split=pl.when(at).then(pl.lit(other)).otherwise(pl.col("split")))
    report = validate(moved.to_arrow(), "records", params)
    assert not report.success and len(report.failures) == 1
    assert "a window is in one split for every unit" in report.failures[0]


def test_a_corpus_of_fewer_than_four_documents_is_refused_before_the_pass(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "three.jsonl"
    corpus.write_text("".join(json.dumps({"text": "word " * 300 + str(i)}) + "\n" for i in range(3)))
    subject = load_subject(tiny_llama_dir)
    with pytest.raises(UserError, match="only 3 document"):  # as the windows are cut: before any pass
        build_windows(subject, str(corpus), tmp_path / "out", window_len=8)
    assert not list((tmp_path / "out").glob("*/*/manifest.json"))


class _Counting(EmbeddingExplainer):
    """The embedding explainer, counting the units it is asked about."""

    asked = 0

    def explain_records(self, records, *args, **kwargs):
        type(self).asked += len(records)
        return super().explain_records(records, *args, **kwargs)


def _unit(index: int, train: bool) -> UnitRecords:
    """A unit of a river-words neuron; with `train`, two of its top windows are in train documents."""
    def rec(words, w, kind, split):
        acts = [3.0 if t in ("river", "bank") else 0.0 for t in words]
        return ActivationRecord(list(words), acts, window_id=w, kind=kind, split=split)
    firing = [("the", "river", "ran", "past", "the", "bank"), ("a", "river", "bank", "in", "May", ".")]
    quiet = ("the", "cat", "sat", "on", "a", "mat")
    splits = ["train", "train", "calib", "valid", "test", "test"] if train else ["calib", "valid", "test"] * 2
    records = [rec(firing[i % 2], 10 * index + i, "top", s) for i, s in enumerate(splits)]
    records += [rec(quiet, 10 * index + 6 + i, "random", s) for i, s in enumerate(("calib", "valid", "test"))]
    return UnitRecords(UnitId.mlp(0, index), records)


def test_a_unit_that_fires_in_no_train_document_is_not_explained_and_its_scores_say_why():
    units = [_unit(0, train=True), _unit(1, train=False)]
    _Counting.asked = 0
    table = pipeline.explain_stage(units, _Counting(), pipeline.ExplainConfig(k=1))
    assert _Counting.asked == 1, "the explainer was asked about a unit it had nothing to be shown of"
    rows = {(r.unit.index, r.method): r for r in from_table(ExplanationRow, table)}
    assert rows[0, pipeline.EXPLAINER].failure is None and rows[0, pipeline.EXPLAINER].candidates
    for method in (pipeline.EXPLAINER, pipeline.LOOKUP):
        assert rows[1, method].failure == pipeline.NOTHING_SHOWN and not rows[1, method].candidates
    chosen, sims = pipeline.simulate_stage(units, table, make_simulator("embedding"))
    sims, chosen = from_table(SimulationRow, sims), from_table(ExplanationRow, chosen)
    scores = pipeline.score_unit(units[1], [s for s in sims if s.unit == units[1].id],
                                 [c for c in chosen if c.unit == units[1].id], SimulationScorer(), n_boot=20)
    explained = [s for s in scores if s.method == pipeline.EXPLAINER]
    assert explained and all(s.value is None and pipeline.NOTHING_SHOWN in s.undefined_reason for s in explained)
    first = [s for s in pipeline.score_unit(units[0], [s for s in sims if s.unit == units[0].id],
                                            [c for c in chosen if c.unit == units[0].id], SimulationScorer(), n_boot=20)
             if s.method == pipeline.EXPLAINER]
    assert any(s.value is not None for s in first)
