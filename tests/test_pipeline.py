"""Explain -> simulate -> score on recorded units: best-of-k selects on valid and reports on test,
outputs meet their contracts, and the reference JSON layout round-trips."""

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from autoexplain import pipeline, scoring
from autoexplain.embedding import EmbeddingSimulator
from autoexplain.interop import export_layer, import_explanations
from autoexplain.layer import StageRef, load_units, run_explain, run_score, run_simulate
from autoexplain.llm_local import LocalLLM
from autoexplain.schemas.contracts import check

UNITS = [0, 5]


@pytest.fixture(scope="module")
def stages(tiny_records, tiny_llama_dir):
    records_dir, out = tiny_records
    llm = LocalLLM(tiny_llama_dir)
    x = run_explain(records_dir, 1, out, UNITS, cfg=pipeline.ExplainConfig(k=3, max_tokens=12), llm=llm)
    sim = EmbeddingSimulator()
    s = run_simulate(records_dir, x, out, sim=sim)
    c = run_score(records_dir, s, out, n_boot=200)
    return records_dir, out, x, s, c, sim


def test_best_of_k_is_chosen_on_valid_and_reported_on_test(stages):
    records_dir, _, x, s, c, sim = stages
    units = {(u.id.index, u.id.polarity): u for u in load_units(records_dir, 1, UNITS)}
    chosen = pl.read_parquet(s.directory / "chosen.parquet").filter(pl.col("method") == "explainer")
    assert chosen.height == 4
    for row in chosen.iter_rows(named=True):
        unit = units[(row["unit"], row["polarity"])]
        valid = [r for r in unit.records if r.split == "valid" and r.kind in ("top", "random")]
        expected = []
        for text in row["candidates"]:
            sims = sim.simulate(text, [r.tokens for r in valid])
            try:
                expected.append(scoring.correlation([r.activations for r in valid], [x.expected for x in sims]))
            except scoring.UndefinedMetric:
                expected.append(float("nan"))
        # The stage's simulator holds the corpus word table (words embedded in its fixed batches);
        # this one may not, so a word's vector can differ in its last bits.
        np.testing.assert_allclose(row["candidate_valid_scores"], expected, rtol=1e-4)
        finite = [e if np.isfinite(e) else -np.inf for e in expected]
        assert row["text"] == row["candidates"][int(np.argmax(finite))]
    sims = pl.read_parquet(s.path)
    assert set(sims["split"]) == {"calib", "test"}, "the chosen explanation is never scored on valid"
    scores = pl.read_parquet(c.path)
    assert set(scores["split"]) == {"test"}
    n_test = {k: sum(r.split == "test" and r.kind in ("top", "random") for r in u.records) for k, u in units.items()}
    top_random = scores.filter((pl.col("metric") == "top_and_random") & (pl.col("method") == "explainer"))
    for row in top_random.iter_rows(named=True):
        assert row["n_records"] + row["n_failed"] == n_test[(row["unit"], row["polarity"])]


def test_baselines_are_scored_like_the_explanation(stages):
    _, _, _, s, c, _ = stages
    scores = pl.read_parquet(c.path)
    assert set(scores["method"]) == {"explainer", "token-lookup", "output-lookup", "shuffled"}
    per = scores.group_by("method").agg(pl.col("metric").n_unique())
    assert per["metric"].to_list() == [5, 5, 5, 5]
    chosen = pl.read_parquet(s.directory / "chosen.parquet")
    # the output-side twin names what each unit promotes, from the recording's statistics
    twins = chosen.filter(pl.col("method") == "output-lookup")
    assert twins.height == chosen.filter(pl.col("method") == "explainer").height
    assert all(t.startswith("promotes the tokens ") for t in twins["text"])
    llm = dict(zip(zip(*[chosen.filter(pl.col("method") == "explainer")[c] for c in ("unit", "polarity")]),
                   chosen.filter(pl.col("method") == "explainer")["text"]))
    shuffled = chosen.filter(pl.col("method") == "shuffled")
    assert sorted(shuffled["text"]) == sorted(llm.values()), "the control reuses other units' explanations"


def test_outputs_meet_their_contracts(stages):
    _, _, x, s, c, _ = stages
    check(pq.read_table(s.path), "simulations", {"window_len": 8})
    check(pq.read_table(c.path), "scores")
    chosen = pq.read_table(s.directory / "chosen.parquet").to_pylist()
    if all(r["text"].strip() for r in chosen):
        check(pq.read_table(s.directory / "chosen.parquet"), "explanations")


def test_rerun_is_a_cache_hit(stages, tiny_llama_dir):
    records_dir, out, x, s, c, sim = stages
    again = run_explain(records_dir, 1, out, UNITS, cfg=pipeline.ExplainConfig(k=3, max_tokens=12),
                        llm=LocalLLM(tiny_llama_dir))
    assert again.directory == x.directory
    assert run_simulate(records_dir, again, out, sim=sim).directory == s.directory


def test_reference_json_layout_round_trips(stages, tmp_path):
    records_dir, _, _, s, c, _ = stages
    units = load_units(records_dir, 1, UNITS)
    export_layer(tmp_path, units, pq.read_table(s.directory / "chosen.parquet"), pq.read_table(s.path),
                 pq.read_table(c.path))
    import json

    neuron = json.loads((tmp_path / "neurons" / "1" / "5.json").read_text())
    assert neuron["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 1, "neuron_index": 5}
    assert len(neuron["most_positive_activation_records"]) == 12
    assert (tmp_path / "explanations" / "1" / "5-neg.jsonl").exists()
    line = json.loads((tmp_path / "explanations" / "1" / "0.jsonl").read_text())
    sims = line["scored_explanations"][0]["scored_simulation"]["scored_sequence_simulations"]
    assert all(len(x["simulation"]["expected_activations"]) == len(x["true_activations"]) for x in sims if x["simulation"]["expected_activations"])
    imported = import_explanations(tmp_path, 1)
    chosen = pl.read_parquet(s.directory / "chosen.parquet").filter(pl.col("method") == "explainer")
    assert sorted(imported.column("text").to_pylist()) == sorted(chosen["text"].to_list())


def test_import_rejects_bad_files(tmp_path):
    from autoexplain.errors import UserError

    (tmp_path / "explanations" / "3").mkdir(parents=True)
    (tmp_path / "explanations" / "3" / "1.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(UserError, match="1.jsonl:1 is not a neuron explanation record"):
        import_explanations(tmp_path, 3)
    with pytest.raises(UserError, match="no explanation files"):
        import_explanations(tmp_path, 4)


def test_layers_recorded_together_keep_their_own_results(tiny_llama_dir, prose_corpus, tmp_path):
    """One records output holding two layers: each layer's explanations stay its own."""
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject

    subject = load_subject(tiny_llama_dir)
    windows = build_windows(subject, str(prose_corpus), tmp_path, window_len=8)
    rec = record_layers(subject, windows, RecordConfig([0, 2], top_k=8, n_random=6, reservoir=32), tmp_path)
    llm, cfg = LocalLLM(tiny_llama_dir), pipeline.ExplainConfig(k=1, max_tokens=6)
    for layer in (0, 2):
        x = run_explain(rec.directory, layer, tmp_path, [0], cfg=cfg, llm=llm)
        assert set(pl.read_parquet(x.path)["layer"]) == {layer}
