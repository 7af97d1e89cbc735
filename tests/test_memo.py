"""Per-unit memos: compacted into the sealed output once a stage is sealed, and still reused.

A stage appends each unit's result to its log while it runs; once its output is sealed the logs
go and an index points at the unit's rows in the sealed tables. A rerun after an edit that touches
one unit (a human revision) must still take every other unit from there, and what it writes must
be exactly what a run without any memo writes.
"""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from autoexplain.counters import since, snapshot
from autoexplain.layer import memo_scope, records_inputs, run_explain, run_revise, run_score, run_simulate


def _records_key(records_dir) -> str:
    return records_inputs(records_dir, 1)[2]


@pytest.fixture(scope="module")
def stages(tiny_records):
    from autoexplain.embedding import EmbeddingSimulator

    records_dir, out = tiny_records
    units = [0, 1, 2, 5]
    x = run_explain(records_dir, 1, out, units, explainer="embedding")
    s = run_simulate(records_dir, x, out, sim=EmbeddingSimulator())
    c = run_score(records_dir, s, out, n_boot=100)
    return records_dir, out, x, s, c


def test_sealed_stages_leave_no_pickles_but_an_index(stages):
    _, out, x, s, c = stages
    for stage, ref, per_unit in (("explain", x, 1), ("simulate", s, 2), ("score", c, 1)):
        assert not list((out / "memo" / stage).rglob("*.log")), f"{stage} memos stayed in their logs"
        (path,) = (out / "memo" / stage / "sealed").rglob(f"{ref.directory.name}.parquet")
        assert path.parent.name == memo_scope(_records_key(stages[0]), 1), "kept under its records and layer"
        index = pl.read_parquet(path)
        assert set(index.columns) == {"key", "unit", "polarity", "shape", "folder", "tables"}
        # 4 neurons x 2 polarities; a simulation result is a unit's own one and its shuffled control.
        assert index["key"].n_unique() == index.height == 8 * per_unit
        assert set(index.select("unit", "polarity").rows()) == {(u, p) for u in (0, 1, 2, 5) for p in (1, -1)}
        assert set(index["folder"]) == {f"{ref.directory.parent.name}/{ref.directory.name}"}, "relative to the root"


def test_a_revision_reuses_the_compacted_units_and_writes_what_a_fresh_run_writes(stages, tmp_path):
    from autoexplain.embedding import EmbeddingSimulator

    records_dir, out, x, s, c = stages
    revised = run_revise(x, {(2, 1): "numbers written in digits"}, out)
    before = snapshot()
    s2 = run_simulate(records_dir, revised, out, sim=EmbeddingSimulator())
    c2 = run_score(records_dir, s2, out, n_boot=100)
    counts = since(before)
    # Unit 2+ alone: its candidate on valid, then it and its two baselines (token-lookup, output-lookup)
    # on held-out; the one shuffled control that carries the revised text; every other unit and
    # control from the compacted memo.
    assert counts["simulate"] == 5 and counts["score_units"] == 2, counts

    # The same stages with no memo at all give the same tables.
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh, ignore=shutil.ignore_patterns("memo"))
    rf = fresh / records_dir.relative_to(out)
    xf = run_revise(run_explain(rf, 1, fresh, [0, 1, 2, 5], explainer="embedding"), {(2, 1): "numbers written in digits"}, fresh)
    sf = run_simulate(rf, xf, fresh, sim=EmbeddingSimulator())
    cf = run_score(rf, sf, fresh, n_boot=100)
    for a, b in ((s2.path, sf.path), (s2.directory / "chosen.parquet", sf.directory / "chosen.parquet"), (c2.path, cf.path)):
        assert a.read_bytes() == b.read_bytes(), a.name  # rows read back as Arrow slices: the same file


def test_a_deleted_sealed_folder_answers_nothing(stages, tmp_path):
    from autoexplain.memo import Memo

    _, out, x, _, _ = stages
    memo = Memo(out, "explain", memo_scope(_records_key(stages[0]), 1))
    index = pl.concat([pl.read_parquet(p) for p in memo.sealed_dir.glob("*.parquet")])
    # A unit that only this folder holds: other modules explain some of the same units of the shared
    # recording into other folders, from which the memo rightly still answers.
    alone = index.group_by("key").agg(pl.col("folder").n_unique().alias("folders")).filter(pl.col("folders") == 1)
    mine = index.join(alone, on="key").filter(pl.col("folder") == f"explanations/{x.directory.name}")
    assert mine.height, "every unit of this folder is held by another folder too: nothing to test"
    key = mine.sort("key")["key"][0]
    rows = memo.get(key)
    assert rows and {(r["unit"], r["polarity"]) for r in rows} == {tuple(index.filter(pl.col("key") == key).select("unit", "polarity").row(0))}
    assert rows == [r for r in pl.read_parquet(x.path).to_dicts() if (r["unit"], r["polarity"]) == (rows[0]["unit"], rows[0]["polarity"])]
    moved = tmp_path / "moved"
    shutil.move(x.directory, moved)
    try:
        assert Memo(out, "explain", memo.sealed_dir.name).get(key) is None, "a result from a folder that is gone"
    finally:
        shutil.move(moved, x.directory)


def test_a_log_cut_short_keeps_every_whole_record_and_drops_the_torn_one(tmp_path):
    from autoexplain.memo import Memo

    memo = Memo(tmp_path, "simulate")
    for i in range(3):
        memo.put(f"k{i}", [{"unit": i, "polarity": 1, "method": "explanation", "x": [0.5] * 100}])
    (log,) = (tmp_path / "memo" / "simulate").glob("*.log")
    whole = log.read_bytes()
    log.write_bytes(whole[:-10])  # a crash in the middle of the last record
    again = Memo(tmp_path, "simulate")
    assert [again.get(f"k{i}") is not None for i in range(3)] == [True, True, False]
    assert again.get("k1")[0]["unit"] == 1
    again.put("k2", [{"unit": 2, "polarity": 1, "method": "explanation"}])  # recomputed, in a log of its own
    assert Memo(tmp_path, "simulate").get("k2") == [{"unit": 2, "polarity": 1, "method": "explanation"}]


def test_an_index_is_kept_in_its_scope_and_an_index_a_later_one_covers_goes(tmp_path):
    from autoexplain.memo import Memo

    def seal(name, units, scope):
        memo = Memo(tmp_path, "score", scope)
        for u in units:
            if memo.get(f"k{u}") is None:  # reads the scope's index, as a stage does before it computes
                memo.put(f"k{u}", [{"unit": u, "polarity": 1, "method": "explainer"}])
        (tmp_path / name).mkdir()
        memo.seal(tmp_path / name, ["t.parquet"])

    seal("a", [0, 1], "L1")
    seal("b", [1, 2], "L1")  # not every result of a's index: both stay
    seal("c", [0, 1, 2], "L1")  # every result of a's and b's: they go
    seal("d", [7], "L2")
    kept = sorted(p.relative_to(tmp_path / "memo" / "score" / "sealed").as_posix()
                  for p in (tmp_path / "memo" / "score" / "sealed").rglob("*.parquet"))
    assert kept == ["L1/c.parquet", "L2/d.parquet"], kept


def _edited_simulator(tmp_path, monkeypatch, name: str, description: str):
    """The embedding simulator reading a prompt whose class `name` has this description (name None:
    one more competitor description)."""
    import json

    from autoexplain.embedding import PROMPT_FILE, EmbeddingSimulator
    from autoexplain.explain import PACKAGE_PROMPTS

    folder = tmp_path / f"prompts-{abs(hash((name, description)))}"
    shutil.copytree(PACKAGE_PROMPTS, folder)
    prompt = json.loads((folder / PROMPT_FILE).read_text())
    if name is None:
        prompt["competitors"].append(description)
    else:
        prompt["classes"][name] = description
    (folder / PROMPT_FILE).write_text(json.dumps(prompt))
    monkeypatch.setenv("AUTOEXPLAIN_PROMPTS", str(folder))
    return EmbeddingSimulator()


def _texts(x) -> list[str]:
    table = pl.read_parquet(x.path)
    return sorted({t for c, t in zip(table["candidates"].to_list(), table["text"].to_list()) for t in (c or [t])} | {""})


def test_a_texts_gate_digest_is_the_same_alone_in_a_batch_and_once_simulated(stages):
    """`prompt_dependence` computes only the gates, for the texts not simulated yet: the digest of
    a text is what it is in any company, and what the full scaling gives."""
    from autoexplain.embedding import EmbeddingSimulator

    texts = _texts(stages[2])
    base = EmbeddingSimulator()
    together = base.fresh().prompt_dependence(texts)
    alone = [base.fresh().prompt_dependence([t])[0] for t in texts[:6]]
    scaled = base.fresh()
    scaled.explanations(texts[1::2])
    assert alone == together[:6] and scaled.prompt_dependence(texts[::-1]) == together[::-1]


@pytest.mark.parametrize("moves", ["some", "none"])
def test_a_simulator_prompt_edit_recomputes_only_the_units_it_can_change(stages, tmp_path, monkeypatch, moves):
    """The embedding simulator's prompt reaches a text only through its gated class z-scores
    (`prompt_dependence`): after an edit, units whose texts it leaves alone are read back, and the
    tables are still exactly what a run without any memo writes with the edited prompt."""
    from autoexplain.embedding import EmbeddingSimulator

    records_dir, out, x, s, c = stages
    texts = _texts(x)
    base = EmbeddingSimulator()
    before = dict(zip(texts, base.prompt_dependence(texts)))
    edits = [("digit", d) for d in ("a number, a year or a date written in digits", "numbers", "words about time",
                                    "a quantity", "money and prices", "a digit")]
    edits += [("punct", d) for d in ("a comma or a period", "punctuation in a sentence", "the end of a sentence")]
    edits += [(None, d) for d in ("a chemical formula", "a recipe for lemon cake", "an email address")]
    for name, description in edits:  # the first edit that moves some (or no) text's gate, but not every one
        sim = _edited_simulator(tmp_path, monkeypatch, name, description)
        moved = sum(a != b for a, b in zip(sim.prompt_dependence(texts), before.values()))
        if sim.prompt_hash != base.prompt_hash and ((0 < moved < len(texts)) if moves == "some" else moved == 0):
            break
    else:
        pytest.fail(f"no edit moved {moves} of the {len(texts)} texts' gates")

    counted = snapshot()
    s2 = run_simulate(records_dir, x, out, sim=sim)
    c2 = run_score(records_dir, s2, out, n_boot=100)
    counts = since(counted)
    assert s2.key != s.key and c2.key != c.key, "the edit is a new output"
    assert set(pl.read_parquet(s2.path)["prompt_hash"]) == {sim.prompt_hash}
    if moves == "none":
        assert counts.get("simulate", 0) == 0 and counts.get("score_units", 0) == 0, counts
        assert counts.get("units_read", 0) == 0, "nothing to compute, no records read"
    else:
        assert 0 < counts["score_units"] < 8 and counts["simulate"] > 0, counts
        # Records are read only for the units simulated or scored again (a shuffled control's too).
        assert 0 < counts["units_read"] < 2 * 8, counts

    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh, ignore=shutil.ignore_patterns("memo"))
    rf = fresh / records_dir.relative_to(out)
    sf = run_simulate(rf, run_explain(rf, 1, fresh, [0, 1, 2, 5], explainer="embedding"), fresh, sim=sim.fresh())
    cf = run_score(rf, sf, fresh, n_boot=100)
    for a, b in ((s2.path, sf.path), (s2.directory / "chosen.parquet", sf.directory / "chosen.parquet"), (c2.path, cf.path)):
        assert a.read_bytes() == b.read_bytes(), a.name  # rows read back as Arrow slices: the same file
