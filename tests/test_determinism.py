"""Same inputs, same bits: the embedding explainer's and simulator's stage outputs do not depend on
the torch (or BLAS) thread count, on which other units share the call (a unit alone or with the rest
of its shard), or on what the process embedded before.

Content keys downstream hash these bytes, so the comparisons are exact (`==` on floats)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autoexplain import pipeline  # noqa: E402
from autoexplain.embedding import EmbeddingSimulator  # noqa: E402
from autoexplain.exact import cosines, fixed_matmul, fixed_sum  # noqa: E402
from autoexplain.explain_embedding import EmbeddingExplainer  # noqa: E402
from autoexplain.wordvecs import forget_texts  # noqa: E402
from autoexplain.records import ActivationRecord, UnitId, UnitRecords  # noqa: E402
from autoexplain.words import word_of_each_token  # noqa: E402


@contextmanager
def threads(n: int):
    """torch and BLAS on n threads; the previous settings afterwards."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


# -- the arithmetic (no model) -------------------------------------------------------------------
def test_fixed_products_do_not_depend_on_shape():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 384)).astype(np.float32)
    b = rng.standard_normal((384, 7)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=0, keepdims=True)
    for f in (fixed_matmul, cosines):
        whole = f(a, b)
        np.testing.assert_allclose(whole, a.astype(np.float64) @ b, atol=1e-6)
        # every entry alone, and every block, gives the same bits as the whole product
        assert np.array_equal(np.block([[f(a[i:i + 1], b[:, j:j + 1]) for j in range(7)] for i in (0, 5, 299)]),
                              whole[[0, 5, 299]])
        assert np.array_equal(f(a[17:200], b[:, 2:5]), whole[17:200, 2:5])
    x = rng.standard_normal((2000, 5))
    assert np.array_equal(fixed_sum(x)[2:3], fixed_sum(x[:, 2:3]))  # numpy's x.sum(0) can differ here
    with pytest.raises(ValueError):
        cosines(a * 10, b * 10)  # |a||b| = 100: a partial sum could round


# -- the explain and simulate stages on planted units ----------------------------------------------
WINDOWS = [
    ["The", " red", " fox", " ate", " 42", " sheep", ".", "\n", " Then", " God", " sm", "it", "ten", "!"],
    [" blue", " and", " green", " hands", ",", " LORD", "'s", " horses", " ran", " 7", " miles"],
    [" She", " painted", " the", " door", " yellow", " in", " 1984", " with", " her", " brother"],
    [" Three", " cows", " and", " two", " goats", " grazed", " near", " the", " river", "."],
    [" Paris", " is", " the", " capital", " of", " France", ";", " Rome", " of", " Italy", "."],
    [" He", " broke", " his", " arm", " and", " hurt", " his", " knee", " at", " 5", " pm"],
    [" The", " violet", " sky", " turned", " orange", " over", " the", " hills", "!", " Wow"],
    [" NASA", " and", " the", " FBI", " met", " on", " Monday", " in", " Washington", "."],
]
RULES = {  # unit -> tokens it fires on
    0: {" red", " blue", " green", " yellow", " violet", " orange"},
    1: {" 42", " 7", " 1984", " 5"},
    2: {" sheep", " horses", " cows", " goats", " fox"},
    3: {" hands", " arm", " knee"},
}


def _units() -> list[UnitRecords]:
    """Four units; every window is a record of every unit, dealt over the four splits."""
    units = []
    for u, fires in RULES.items():
        records = []
        for w, tokens in enumerate(WINDOWS * 2):
            acts = [10.0 if t in fires else 0.0 for t in tokens]
            split = ("train", "valid", "calib", "test")[w % 4]
            kind = "top" if split == "train" or max(acts) > 0 else "random"
            records.append(ActivationRecord(list(tokens), acts, window_id=w, kind=kind, split=split))
        units.append(UnitRecords(UnitId.mlp(0, u), records))
    return units


@pytest.fixture(scope="module")
def models():
    return EmbeddingExplainer(), EmbeddingSimulator()


def _word_table(units):
    return sorted({w for u in units for r in u.records for w in word_of_each_token(r.tokens)} - {""})


def _run(models, units, n_threads: int, word_table: bool, alone: bool, warm_with=()):
    """(explanations rows, chosen rows, simulation rows) of the stages, with fresh caches."""
    explainer0, simulator0 = models
    forget_texts()  # and nothing the process embedded before
    with threads(n_threads):
        explainer = EmbeddingExplainer()
        explainer._model = explainer0._model  # the loaded model, not its caches
        simulator = simulator0.fresh()
        if warm_with:  # a process that embedded other texts and words before
            simulator.simulate_many(list(warm_with), [w[::-1] for w in WINDOWS])
            explainer.explain_records([[ActivationRecord(w[::-1], [1.0] * len(w)) for w in WINDOWS]])
        if word_table:
            words = _word_table(units)
            vectors = simulator.encode_words(words)
            explainer.add_words(words, vectors)
            simulator.add_words(words, vectors)
        cfg = pipeline.ExplainConfig(k=3, batch_units=8)
        groups = [[u] for u in units] if alone else [units]
        explanations, chosen, sims = [], [], []
        for group in groups:
            table = pipeline.explain_stage(group, explainer, cfg)
            c, s = pipeline.simulate_stage(group, table, simulator)
            explanations += table.to_pylist()
            chosen += c.to_pylist() if hasattr(c, "to_pylist") else list(c)
            sims += s.to_pylist() if hasattr(s, "to_pylist") else list(s)
    key = lambda r: (r["unit"], r["polarity"], r["method"], r.get("split", ""), r.get("window_id", -1))  # noqa: E731
    return [sorted(rows, key=lambda r: repr(key(r))) for rows in (explanations, chosen, sims)]


def _bits(rows) -> str:
    """Rows as text that tells every float apart by its bits (repr round-trips; nan equals nan)."""
    return repr(rows)


def _without_controls(rows):
    return [r for r in rows if r["method"] != pipeline.SHUFFLED]


@pytest.mark.slow
@pytest.mark.parametrize("word_table", [True, False], ids=["word-table", "no-word-table"])
def test_stage_outputs_do_not_depend_on_threads_or_batch(models, word_table):
    units = _units()
    shard_2 = _run(models, units, 2, word_table, alone=False)
    shard_1 = _run(models, units, 1, word_table, alone=False,
                   warm_with=["capital cities", "numbers written out as words", "the word 'God'"])
    alone_1 = _run(models, units, 1, word_table, alone=True)
    alone_2 = _run(models, units, 2, word_table, alone=True)
    explanations, chosen, sims = shard_2
    assert sims and any(max(r["expected"]) > 0 for r in sims)
    assert any(r["method"] == pipeline.SHUFFLED for r in sims)  # the shard run has its controls
    # threads, and what was embedded before: the whole outputs, controls included, are the same bits
    assert _bits(shard_1) == _bits(shard_2)
    assert _bits(alone_1) == _bits(alone_2)
    # a unit explained and simulated alone gives the rows it gets with the rest of its shard
    assert _bits(alone_1[0]) == _bits(explanations)
    assert _bits(alone_1[1]) == _bits(_without_controls(chosen))
    assert _bits(alone_1[2]) == _bits(_without_controls(sims))


@pytest.mark.slow
def test_a_text_embeds_to_the_same_bits_alone_in_a_batch_and_on_any_thread_count(models):
    import torch

    _, simulator0 = models
    before = torch.get_num_threads()
    texts = ["animals and livestock", "red", "the word 'God'", "an explanation that is much longer than the rest"]
    out = []
    for n_threads in (1, 2):
        with threads(n_threads):
            sim = simulator0.fresh()
            forget_texts()  # each way below embeds anew, not from the process's earlier vectors
            out.append(sim._encode(texts))
            forget_texts()
            out.append(np.stack([sim._encode([t])[0] for t in texts]))
            forget_texts()
            out.append(sim._encode(texts[::-1] + ["horse", "x"])[:len(texts)][::-1])
    assert all(np.array_equal(out[0], o) for o in out[1:])
    assert torch.get_num_threads() == before  # the encoder pins one thread only while it embeds


@pytest.mark.slow
def test_texts_batched_by_padded_width_keep_the_bits_they_have_one_by_one(models, monkeypatch):
    from autoexplain import wordvecs

    sim = models[1].fresh()
    words = ["horse", "river", "seven", "light", "stone", "music", "green", "apple", "bread", "cloud",
             "dance", "eagle", "flame", "grape", "heart", "ivory", "jelly", "knife", "lemon", "mango"]
    texts = [f'the word "{w}"' for w in words] + [f"words related to {a} and {b}" for a, b in zip(words, words[3:])]
    wordvecs.forget_texts()
    batched = wordvecs.encode_each(sim.model, texts)  # 20+ texts of one padded width: several passes
    monkeypatch.setattr(wordvecs, "EACH_BATCH", 1)
    wordvecs.forget_texts()
    one_by_one = wordvecs.encode_each(sim.model, texts[::-1])[::-1]
    assert np.array_equal(batched, one_by_one)


@pytest.mark.slow
def test_texts_shared_with_the_helper_process_keep_their_bits(models, monkeypatch):
    """A long list is shared with a helper process (`encode_helper`); a vector is the same bits
    whichever process embedded it. Both take pieces as they free up, so the test checks that the
    helper took some, then that the whole list equals the list embedded here alone."""
    from autoexplain import encode_helper, wordvecs

    sim = models[1].fresh()
    words = ["horse", "river", "seven", "light", "stone", "music", "green", "apple", "bread", "cloud",
             "dance", "eagle", "flame", "grape", "heart", "ivory", "jelly", "knife", "lemon", "mango"]
    texts = [f"{a} and {b}, {c} or {d}" for a in words for b in words[:4] for c in words[5:8] for d in ("x", "to a y z")]
    assert len(set(texts)) >= encode_helper.HELP_FROM
    helper = encode_helper.pool(sim.model_path, sim.device)
    assert helper is not None and helper.submit(wordvecs.encode_in_helper, texts[:2]).result().shape == (2, 384)  # started
    taken = []
    real_store = encode_helper.shared

    def counting(pieces, here, store, pool, there):
        return real_store(pieces, here, lambda piece, rows: (taken.append(piece), store(piece, rows)), pool, there)

    monkeypatch.setattr(encode_helper, "shared", counting)
    wordvecs.forget_texts()
    shared = wordvecs.encode_each(sim.model, texts, (sim.model_path, sim.device))
    wordvecs.forget_texts()
    alone = wordvecs.encode_each(sim.model, texts)
    assert taken, "the helper embedded none of the pieces"
    assert np.array_equal(shared, alone)


@pytest.mark.slow
def test_a_text_embedded_before_in_the_process_is_not_embedded_again(models, monkeypatch):
    """Shards' simulators start empty, but the process remembers the texts it embedded: a text that
    recurs is not sent to the model again, and comes back with the bits it had."""
    from autoexplain import wordvecs

    sim = models[1].fresh()
    wordvecs.forget_texts()
    first = wordvecs.encode_each(sim.model, ["a river bank", "money and banks"])
    sent = []
    forward = wordvecs._forward

    def counting(model, features):
        sent.append(len(features))
        return forward(model, features)

    monkeypatch.setattr(wordvecs, "_forward", counting)
    again = wordvecs.encode_each(sim.model, ["money and banks", "a fishing boat", "a river bank"])
    assert sum(sent) == 1, "only the new text goes to the model"
    assert np.array_equal(again[[2, 0]], first)
    wordvecs.forget_texts()
    assert np.array_equal(wordvecs.encode_each(sim.model, ["a fishing boat"])[0], again[1])


@pytest.mark.slow
def test_a_helper_that_cannot_start_leaves_the_work_here(models):
    """A helper whose start-up fails (here: no model at its path) costs nothing but the attempt: the
    texts are embedded here, with their own bits, and that helper is not started again."""
    from autoexplain import encode_helper, wordvecs

    sim = models[1].fresh()
    texts = [f"item {i} of the list, and words near it" for i in range(encode_helper.HELP_FROM)]
    broken = ("/nonexistent/embedder", "cpu")
    with pytest.raises(Exception):  # noqa: B017 - the pool's own error for a failed start-up
        encode_helper.pool(*broken).submit(wordvecs.encode_in_helper, ["x"]).result()
    wordvecs.forget_texts()
    shared = wordvecs.encode_each(sim.model, texts, broken)
    wordvecs.forget_texts()
    assert np.array_equal(shared, wordvecs.encode_each(sim.model, texts))
    for _ in range(50):  # the feeder thread drops the helper as it meets the error; this call never waits
        if encode_helper.pool(*broken) is None:
            break
        time.sleep(0.1)
    assert encode_helper.pool(*broken) is None
