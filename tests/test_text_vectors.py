"""Explanation texts embedded once per explanations output and kept beside the outputs, with what
of them the prompt cannot change (each text's mean and sd against the background): a rerun after a
simulator-prompt edit loads them, computes none of it again, and gets the bits a fresh computation
gives. A file kept against another background, or by an older version without statistics, is
computed again and replaced."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from autoexplain import embedding, layout
from autoexplain.layer import run_explain
from autoexplain.text_vectors import explanation_texts, use_text_vectors


@pytest.fixture(scope="module")
def explained(tiny_records, tmp_path_factory):
    records_dir, out = tiny_records
    x = run_explain(records_dir, 1, out, [0, 1, 2, 5], explainer="embedding")
    return pq.read_table(x.path), tmp_path_factory.mktemp("vectors-out")


def _kept(out):
    (path,) = layout.memo(out, "text_vectors").glob("*.npz")
    with np.load(path, allow_pickle=False) as saved:
        return path, {k: saved[k] for k in saved.files}


def _counting(monkeypatch):
    calls = []
    real = embedding.background_stats

    def counted(background, F):
        calls.append(F.shape[1])
        return real(background, F)

    monkeypatch.setattr(embedding, "background_stats", counted)
    return calls


def test_kept_statistics_are_loaded_not_computed_and_give_the_same_bits(explained, monkeypatch):
    table, out = explained
    texts = explanation_texts(table)
    first = embedding.EmbeddingSimulator()
    use_text_vectors(table, out, first)
    _, kept = _kept(out)
    assert {"forms", "vectors", "stated", "stats", "background"} <= set(kept)
    assert kept["stated"].tolist() == texts and kept["stats"].shape == (len(texts), 2)

    calls = _counting(monkeypatch)
    again = first.fresh()
    use_text_vectors(table, out, again)
    digests = again.prompt_dependence(texts)
    records = [["The", " cat", " sat", " in", " 1999", "."], [" Paris", ",", " France"]]
    sims = again.simulate_many(texts[:5], records)
    assert calls == [], "a kept text's background statistics were computed again"

    fresh = first.fresh()  # the same simulator with nothing kept: computes them
    assert fresh.prompt_dependence(texts) == digests
    assert [[s.expected for s in row] for row in fresh.simulate_many(texts[:5], records)] == \
        [[s.expected for s in row] for row in sims]
    assert calls, "the fresh twin computed its statistics"


@pytest.mark.parametrize("stale", ["another background", "no statistics"])
def test_a_stale_or_older_file_is_computed_again_and_replaced(explained, tmp_path, stale):
    table, _ = explained
    sim = embedding.EmbeddingSimulator()
    use_text_vectors(table, tmp_path, sim)
    path, kept = _kept(tmp_path)
    if stale == "another background":
        kept["background"] = np.array("0123456789abcdef")
    else:
        kept = {k: kept[k] for k in ("forms", "vectors")}
    np.savez(path, **kept)
    assert sim.fresh().add_texts(**kept) is False
    use_text_vectors(table, tmp_path, sim.fresh())
    _, now = _kept(tmp_path)
    assert str(now["background"]) == str(_kept_fresh(table, tmp_path / "fresh")["background"])
    assert now["stats"].shape == (len(explanation_texts(table)), 2)


def _kept_fresh(table, out):
    use_text_vectors(table, out, embedding.EmbeddingSimulator())
    return _kept(out)[1]
