"""Top exemplars are windows where the unit fires. A tiny SAE on the tiny Llama has one latent
(RARE) whose bias lets it fire in only three windows, fewer than top_k: it gets three top records,
no test-split one, so the scores that need an activating test window are undefined (not the 0.5
of telling zeros from zeros), and the explainer and the viewer make do with what it has."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from autoexplain.classify import activating
from autoexplain.layer import load_units
from autoexplain.layout import records_table
from autoexplain.pipeline import ExplainConfig, explain_units, shown_records
from autoexplain.record import RecordConfig, build_windows, record_layers
from autoexplain.records import SPLITS, ActivationRecord, Simulation
from autoexplain.registry import make_explainer
from autoexplain.sae_coder import HookPoint
from autoexplain.sae_train import capture
from autoexplain.score_simulation import DETECTION_AUC, SimulationScorer
from autoexplain.source_coder import open_unit_source
from autoexplain.splits import document_splits
from autoexplain.subject import load_subject
from autoexplain.view_data import records_part
from tests.test_sae import cfg_6x, write_saelens

D_MODEL, LATENTS, RARE, FIRING, TOP_K, N_RANDOM = 32, 6, 1, 3, 12, 9


@pytest.fixture(scope="module")
def recorded(tiny_llama_dir, prose_corpus, tmp_path_factory):
    """(records folder, windows): the SAE's layer 1, recorded with top_k = TOP_K."""
    out = tmp_path_factory.mktemp("out")
    subject = load_subject(tiny_llama_dir)
    windows = build_windows(subject, str(prose_corpus), out, window_len=8, seed=0)
    table = pl.read_parquet(windows.path)
    ids = torch.tensor(table["token_ids"].to_list())
    x = capture(subject.model, HookPoint(1, "resid_post"), ids).float()
    split = document_splits(table["doc_id"].to_numpy(), seed=0)  # as the recording below deals them
    # RARE's bias sits halfway between its FIRING-th and next best window maxima: it fires in
    # exactly FIRING windows, the others (bias 0) in nearly every one. Its encoder is the first
    # whose FIRING windows are clear of the next (bf16 hidden states) and lie in documents of the
    # train split and of no test one: the case this file is about.
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        w_enc = torch.randn(D_MODEL, LATENTS, generator=g)
        best, order = (x @ w_enc)[..., RARE].amax(1).sort(descending=True)
        where = {SPLITS[split[i]] for i in order[:FIRING].tolist()}
        if best[FIRING - 1] - best[FIRING] > 0.04 * best[0] and "train" in where and "test" not in where:
            break
    else:
        raise AssertionError("no encoder in 100 gives the case")
    b_enc = torch.zeros(LATENTS)
    b_enc[RARE] = -float(best[FIRING - 1] + best[FIRING]) / 2
    sae = write_saelens(tmp_path_factory.mktemp("sae") / "rare", dict(cfg_6x("standard", "blocks.1.hook_resid_post"),
                        d_in=D_MODEL, d_sae=LATENTS),
                        {"W_enc": w_enc, "W_dec": torch.randn(LATENTS, D_MODEL, generator=g),
                         "b_dec": torch.zeros(D_MODEL), "b_enc": b_enc})
    source = open_unit_source(f"sae:{sae}", tiny_llama_dir)
    cfg = RecordConfig([1], top_k=TOP_K, n_random=N_RANDOM, quantile_per_bin=2, reservoir=48)
    return record_layers(subject, windows, cfg, out, source=source).directory


def test_a_latent_firing_in_fewer_windows_than_top_k_has_only_those_as_top_records(recorded):
    records = pl.read_parquet(records_table(recorded, 1))
    top = records.filter(pl.col("kind") == "top")
    rare = top.filter(pl.col("unit") == RARE).sort("rank")
    # old code: TOP_K top records, the last nine never firing, three of them in test
    assert rare.height == FIRING, rare.select("rank", "split", "max_activation")
    assert rare["rank"].to_list() == list(range(FIRING))
    split = document_splits(pl.read_parquet(next(recorded.parent.parent.glob("windows/*/windows.parquet")))["doc_id"].to_numpy(), seed=0)
    assert rare["split"].to_list() == [SPLITS[split[w]] for w in rare["window_id"].to_list()]  # their documents'
    assert "test" not in rare["split"].to_list()
    # every top and quantile exemplar of the layer fires (old code: RARE's quantile draws were zeros)
    shown = records.filter(pl.col("kind") != "random")
    assert (shown["max_activation"] > 0).all(), shown.filter(pl.col("max_activation") <= 0)
    assert all(max(a) > 0 for a in shown["activations"].to_list())
    # the others fire in more windows than top_k and keep them all; random records stay random
    per_unit = top.group_by("unit").len().sort("unit")
    assert per_unit.filter(pl.col("unit") != RARE)["len"].to_list() == [TOP_K] * (LATENTS - 1)
    randoms = records.filter(pl.col("kind") == "random").group_by("unit").len()
    assert randoms["len"].to_list() == [N_RANDOM] * LATENTS
    assert (records.filter((pl.col("unit") == RARE) & (pl.col("kind") == "random"))["max_activation"] == 0).all()


def _perfect(unit) -> list[Simulation]:
    """A simulator that predicts the truth: whatever an explanation says, the scores below only
    depend on which windows are there."""
    return [Simulation(list(r.activations)) for r in unit.records]


def test_scores_that_need_an_activating_test_window_are_undefined_without_one(recorded):
    (unit,) = load_units(recorded, 1, [RARE])
    assert not [r for r in unit.records if r.kind == "top" and r.split == "test"]
    scores = SimulationScorer().score("x", unit.records, _perfect(unit), n_boot=20)
    assert scores[DETECTION_AUC].value is None, scores[DETECTION_AUC]  # old code: 0.5
    assert scores[DETECTION_AUC].undefined_reason == "no activating or no non-activating windows"
    assert activating(unit.records) == []  # the classifier scorers ask nothing: NO_TRIALS


def test_a_top_record_that_never_fires_is_not_activating():
    """Records of an older recording, whose top records could be windows where the unit never
    fires: the scorers do not take those as activating."""
    tokens = [f"t{i}" for i in range(4)]
    recs = [ActivationRecord(tokens, [0.0] * 4, window_id=1, kind="top", split="test"),
            ActivationRecord(tokens, [0.0, 2.0, 0.0, 0.0], window_id=2, kind="top", split="calib"),
            *(ActivationRecord(tokens, [0.0] * 4, window_id=w, kind="random", split=s)
              for w, s in ((3, "test"), (4, "test"), (5, "calib")))]
    sims = [Simulation([float(i) for i in range(4)]) for _ in recs]
    assert SimulationScorer().score("x", recs, sims, n_boot=20)[DETECTION_AUC].value is None  # old code: 0.5
    assert activating(recs) == []
    recs[0].activations[2] = 1.0  # once it fires, it is activating again
    assert SimulationScorer().score("x", recs, sims, n_boot=20)[DETECTION_AUC].value == 0.5
    assert activating(recs) == [recs[0]]


def test_the_explainer_and_the_viewer_make_do_with_few_top_records(recorded):
    (unit,) = load_units(recorded, 1, [RARE])
    shown = shown_records(unit, 5)
    assert shown and all(r.max_activation > 0 for r in shown), [(r.kind, r.max_activation) for r in shown]
    rows = explain_units([unit], make_explainer("embedding"), ExplainConfig(k=1))
    assert rows[0].failure is None and rows[0].candidates and rows[0].candidates[0].strip()
    part = records_part(unit, 3)
    assert part["n_records"]["top"] == FIRING and part["scale"] > 0
    assert sorted(r["m"] for r in part["records"] if r["k"] == "top") == \
        sorted(round(r.max_activation, 6) for r in unit.records if r.kind == "top")
    assert np.isfinite(part["step"])
