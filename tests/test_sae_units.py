"""A sparse coder's latents as units: recorded in the streaming pass with the same exemplars and
splits as neurons, one polarity each, dead latents reported and not explained; then explain-layer,
rescore and the tables downstream on a tiny model, end to end from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from autoexplain.errors import UserError
from autoexplain.record import RecordConfig, build_windows, record_layers
from autoexplain.sae_coder import HookPoint
from autoexplain.sae_train import capture
from autoexplain.source_coder import CoderSource, kind_of, open_unit_source
from autoexplain.storage import read_run
from autoexplain.subject import load_subject
from tests.test_cli_runs import cli
from tests.test_sae import cfg_6x, write_saelens, write_sparsify
from tests.viewer_fixtures import Watched, browser, chromium, file_url  # noqa: F401 (fixtures)

D_MODEL, LATENTS, DEAD = 32, 40, 7  # the tiny Llama's width; latent DEAD never fires


def _write_sae(folder, seed: int = 3):
    """A standard ReLU SAE on the tiny Llama's layer-1 residual stream, in SAELens 6.x layout."""
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D_MODEL, LATENTS, generator=g), "W_dec": torch.randn(LATENTS, D_MODEL, generator=g),
         "b_dec": torch.zeros(D_MODEL), "b_enc": torch.zeros(LATENTS)}
    t["b_enc"][DEAD] = -1e6
    cfg = dict(cfg_6x("standard", "blocks.1.hook_resid_post"), d_in=D_MODEL, d_sae=LATENTS)
    return write_saelens(folder, cfg, t)


@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory):
    return _write_sae(tmp_path_factory.mktemp("sae") / "res_l1")


@pytest.fixture(scope="module")
def recorded(tiny_llama_dir, prose_corpus, tiny_sae, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    subject = load_subject(tiny_llama_dir)
    source = open_unit_source(f"sae:{tiny_sae}", tiny_llama_dir)
    windows = build_windows(subject, str(prose_corpus), out, window_len=8, seed=0)
    cfg = RecordConfig([1], top_k=10, n_random=6, quantile_per_bin=1, reservoir=40)
    ref = record_layers(subject, windows, cfg, out, source=source)
    return subject, source, windows, ref


def test_the_kind_names_the_coder_and_the_source_reads_its_layer(tiny_sae, tiny_llama_dir):
    source = open_unit_source(f"sae:{tiny_sae}", tiny_llama_dir)
    assert isinstance(source, CoderSource) and source.kind == "sae-res-40" and source.layer == 1
    assert source.polarities == (1,) and kind_of(f"sae:{tiny_sae}") == "sae-res-40"
    assert kind_of("mlp") == "mlp" and kind_of("sae-res-16k") == "sae-res-16k"
    assert open_unit_source("mlp", tiny_llama_dir).kind == "mlp"


def test_latents_are_recorded_as_their_formula_one_polarity_dead_ones_without_records(recorded):
    subject, source, windows, ref = recorded
    records = pl.read_parquet(ref.records_path(1))
    stats = pl.read_parquet(ref.stats_path(1))
    assert set(records["polarity"].unique()) == {1} and set(stats["polarity"].unique()) == {1}
    assert stats.height == LATENTS
    assert set(records["unit"].unique()) == set(range(LATENTS)) - {DEAD}
    dead = stats.filter(pl.col("unit") == DEAD).row(0, named=True)
    assert dead["max"] <= 0 and dead["frac_active"] == 0
    from autoexplain.layer import dead_units

    assert dead_units(ref.directory, 1) == [DEAD]
    assert set(records["split"].unique()) >= {"train", "valid", "test"}
    # Each unit's splits never share a window: exemplars shown to the explainer are never scored.
    for (unit,), g in records.group_by(["unit"]):
        ids = g.group_by("split").agg(pl.col("window_id"))
        seen = [set(x) for x in ids["window_id"].to_list()]
        assert sum(map(len, seen)) == len(set().union(*seen)), unit
    # A top record's activations equal the encoder's formula on the hidden states at the hook point.
    row = records.filter(pl.col("kind") == "top").sort("max_activation", descending=True).row(0, named=True)
    win = pl.read_parquet(windows.path).filter(pl.col("window_id") == row["window_id"]).row(0, named=True)
    x = capture(subject.model, HookPoint(1, "resid_post"), torch.tensor([win["token_ids"]]))[0].float()
    coder = source.coder
    expected = torch.relu((x - coder.b_dec) @ coder.W_enc + coder.b_enc)[:, row["unit"]].numpy()
    np.testing.assert_allclose(row["activations"], expected, rtol=0.02, atol=0.02)  # stored as bf16 on the way
    manifest = json.loads((ref.directory / "manifest.json").read_text())
    assert manifest["params"]["source"] == "sae-res-40"


@pytest.mark.parametrize("fused", ["1", "0"])
def test_several_sources_are_recorded_in_one_pass_as_each_alone(tiny_llama_dir, prose_corpus, tiny_sae, tmp_path,
                                                               monkeypatch, fused):
    """explain-model's MLP layers and a coder's latents from one pass of the subject (fused, and Hugging
    Face's hooked forward): each folder has the same key and the same tables as its source's own pass."""
    from autoexplain.counters import since, snapshot
    from autoexplain.record import record_sources
    from autoexplain.sources import MLP

    monkeypatch.setenv("AUTOEXPLAIN_FUSED", fused)
    subject = load_subject(tiny_llama_dir)
    assert (subject.fused is not None) == (fused == "1")
    coder = open_unit_source(f"sae:{tiny_sae}", tiny_llama_dir)
    small = dict(top_k=10, n_random=6, quantile_per_bin=1, reservoir=40, batch_size=5)
    plans = [(MLP, RecordConfig([0, 2], **small)), (coder, RecordConfig([1], **small))]
    alone = []
    for source, cfg in plans:
        windows = build_windows(subject, str(prose_corpus), tmp_path / "alone", window_len=8, seed=0)
        alone.append(record_layers(subject, windows, cfg, tmp_path / "alone", source=source))
    windows = build_windows(subject, str(prose_corpus), tmp_path / "shared", window_len=8, seed=0)
    before = snapshot()
    shared = record_sources(subject, windows, plans, tmp_path / "shared")
    batches = -(-windows.n_windows // 5)
    assert since(before)["subject_forward"] == batches  # one pass, not one per source
    for a, b in zip(alone, shared):
        assert a.key == b.key and a.layers == b.layers
        for layer in a.layers:
            for path in (a.records_path(layer), a.stats_path(layer)):
                mine = b.directory / path.name
                assert pl.read_parquet(path).equals(pl.read_parquet(mine)), mine
    again = snapshot()
    assert [r.key for r in record_sources(subject, windows, plans, tmp_path / "shared")] == [r.key for r in shared]
    assert since(again).get("subject_forward", 0) == 0  # sealed: nothing is recorded twice


def test_new_weights_at_the_same_path_record_anew(tiny_llama_dir, tiny_sae, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(tiny_sae, tmp_path / "sae")
    before = open_unit_source(f"sae:{copy}", tiny_llama_dir).identity()
    t = load_file(copy / "sae_weights.safetensors")
    t["b_enc"] = t["b_enc"] + 0.5
    save_file(t, copy / "sae_weights.safetensors")
    after = open_unit_source(f"sae:{copy}", tiny_llama_dir).identity()
    assert before["kind"] == after["kind"] and before["weights"] != after["weights"]


def test_a_sparsify_run_is_a_source_per_hookpoint_the_layers_pick(tiny_llama_dir, tmp_path):
    """explain-model with a sparsify run's folder (a coder per hookpoint) and --layers: each layer
    asked reads its own hookpoint folder's coder; a layer the run has no coder for is one line."""
    from autoexplain.model_plan import explain_model

    g = torch.Generator().manual_seed(0)
    for layer in (0, 2):
        write_sparsify(tmp_path / "run" / f"layers.{layer}", {"W_enc": torch.randn(D_MODEL, 48, generator=g),
                       "b_enc": torch.zeros(48), "W_dec": torch.randn(48, D_MODEL, generator=g), "b_dec": torch.zeros(D_MODEL)})
    spec = f"sae:{tmp_path / 'run'}"

    def plan(layers):
        return [(s, [(part.layer, part.source.kind, part.source.coder.hook.layer) for part in parts])
                for s, parts in explain_model({"model": tiny_llama_dir, "sources": [spec], "layers": layers}).sources]

    assert plan("2") == [(f"{spec}/layers.2", [(2, "sae-res-48", 2)])]
    assert plan(None) == [(f"{spec}/layers.{layer}", [(layer, "sae-res-48", layer)]) for layer in (0, 2)]
    with pytest.raises(UserError, match="holds no coder for layer 1 "):
        plan("1")


def test_bad_sources_are_one_line_before_any_work(tiny_llama_dir, tiny_sae, tmp_path):
    with pytest.raises(UserError, match="disagrees"):
        open_unit_source(f"sae:{tiny_sae}", tiny_llama_dir, layer=2)
    with pytest.raises(UserError):
        open_unit_source(f"sae:{tmp_path}", tiny_llama_dir)
    with pytest.raises(UserError, match="no unit source"):
        kind_of("SAE please")


def test_a_coder_moved_since_its_recording_is_read_where_it_is_now(tiny_llama_dir, prose_corpus, tiny_sae, tmp_path):
    """A recording is keyed by its coder's content, so one made with the coder at a path it has since
    left is reused, and names that path: the hard negatives read the coder where the run says it is."""
    import shutil

    from autoexplain.negatives import run_negatives

    subject, out = load_subject(tiny_llama_dir), tmp_path / "out"
    first = shutil.copytree(tiny_sae, tmp_path / "first" / "res_l1")
    windows = build_windows(subject, str(prose_corpus), out, window_len=8, seed=0)
    cfg = RecordConfig([1], top_k=10, n_random=6, quantile_per_bin=1, reservoir=40)
    made = record_layers(subject, windows, cfg, out, source=open_unit_source(f"sae:{first}", tiny_llama_dir))
    now = tmp_path / "now" / "res_l1"
    now.parent.mkdir()
    shutil.move(first, now)
    again = record_layers(subject, windows, cfg, out, source=open_unit_source(f"sae:{now}", tiny_llama_dir))
    assert again.directory == made.directory
    found = run_negatives(again.directory, 1, out, tiny_llama_dir, [(8, 1), (9, 1)], source=f"sae:{now}")
    assert pl.read_parquet(found / "layer_1.parquet").height > 0
    with pytest.raises(UserError, match=f"was recorded with is no longer at {first}"):
        run_negatives(again.directory, 1, tmp_path / "a", tiny_llama_dir, [(8, 1)])
    other = _write_sae(tmp_path / "other" / "res_l1", seed=4)
    with pytest.raises(UserError, match="is not the one"):
        run_negatives(again.directory, 1, tmp_path / "b", tiny_llama_dir, [(8, 1)], source=f"sae:{other}")


@pytest.mark.slow
def test_explain_layer_and_rescore_on_latents_from_the_command_line(tiny_llama_dir, prose_corpus, tiny_sae,
                                                                   tmp_path_factory, browser):
    import shutil

    home, out = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("sae-run") / "out"
    sae = shutil.copytree(tiny_sae, out.parent / "coder" / "res_l1")
    common = ["--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--tokens", "20000", "--k", "1",
              "--bootstrap", "50", "--window-len", "8", "--top-k", "8", "--random", "6", "--out", str(out)]
    # the layer comes from the coder; the dead latent 7 is a shard of its own. The coder's path is
    # given relative to where the command runs, and kept absolute for commands run elsewhere
    result = cli(home, "explain-layer", "--source", "sae:coder/res_l1", "--units", "7-9", "--shard-size", "1", *common,
                 cwd=out.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    run = read_run(out, 1, "sae-res-40")
    assert run["params"]["layer"] == 1 and run["records"]["source"] == "sae-res-40"
    assert run["params"]["source"] == f"sae:{sae}"
    assert not (out / "runs" / "layer_1.json").exists()
    scores = pl.concat([pl.read_parquet(r["path"]) for r in run["scores"]])
    assert set(scores["source"].unique()) == {"sae-res-40"} and set(scores["polarity"].unique()) == {1}
    assert set(scores["unit"].unique()) == {8, 9}  # the dead latent is not explained
    site = out / "site" / "layer_1.sae-res-40"
    chosen = pl.concat([pl.read_parquet(Path(r["path"]).parent / "chosen.parquet").filter(pl.col("method") == "explainer")
                        for r in run["simulations"]])
    w = Watched(browser, file_url(site))
    page = w.open("unit.html#L1/sae-res-40/N8")
    page.wait_for_selector("body[data-ready='1']")
    assert page.text_content("#explanation") == chosen.filter(pl.col("unit") == 8)["text"][0]
    assert page.locator("#outputs .tok.up").count() == 10 and page.locator("#ex-top .exemplar").count() > 0
    page.screenshot(path=out.parent / "sae_unit.png", full_page=True)
    dead = w.open("layer.html#L1/sae-res-40")
    dead.wait_for_selector("#dead")
    assert dead.text_content("#dead").startswith("1 more never fired on the recorded tokens")
    dead = w.open("unit.html#L1/sae-res-40/N7")  # with its statistics and a way on to the explained units
    assert "never fired on the recorded tokens" in dead.text_content("#explanation")
    assert "active on 0.0% of tokens" in dead.text_content("#stats") and dead.locator("#prev-unit").count() == 0
    dead.click("#next-unit")
    dead.wait_for_selector("body[data-unit='L1/sae-res-40/N8'][data-ready='1']")
    w.close()

    elsewhere = cli(home, "rescore", "--out", str(out), "--source", "sae-res-40", "--bootstrap", "60",
                    "--scorers", "simulation,embedding", cwd=Path("/"))
    assert elsewhere.returncode == 0, elsewhere.stderr[-4000:]

    # no --layer: the coder's own (not the default 15); the coder moved since, and the hard negatives
    # of the classifier scorer read it where it is now, not where the recording names it
    moved = shutil.move(sae, out.parent / "moved" / "res_l1")
    again = cli(home, "rescore", "--out", str(out), "--source", f"sae:{moved}", "--bootstrap", "60",
                "--scorers", "simulation,embedding")
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((out / "runs" / "layer_1.sae-res-40.json").read_text())["flow"] == "rescore"
    rescored = pl.concat([pl.read_parquet(r["path"]) for r in read_run(out, 1, "sae-res-40")["scores"]])
    assert {"embedding_auc@similar", "embedding_auc@cofiring"} <= set(rescored["metric"]), "negatives from the moved coder"
    assert set(rescored["source"]) == {"sae-res-40"}, "the classifier scorer's rows say their source too"
    # by its kind, the run's coder is looked for where the recording names it: gone, one line first
    gone = cli(home, "rescore", "--out", str(out), "--source", "sae-res-40", "--bootstrap", "60",
               "--scorers", "simulation,embedding")
    assert gone.returncode == 2 and "Flow run" not in gone.stderr and "Traceback" not in gone.stderr, gone.stderr[-3000:]
    assert f"--source: the coder that {read_run(out, 1, 'sae-res-40')['records']['path']} was recorded with is no " \
        f"longer at {sae}" in gone.stderr, gone.stderr[-2000:]
    shutil.move(moved, sae)  # back where the recording names it, for the run's lookups by kind below
    # no --source either: the default (MLP neurons, layer 15) has no run here, and the line says what has
    plain = cli(home, "rescore", "--out", str(out), "--bootstrap", "60")
    assert plain.returncode == 2, plain.stderr[-4000:]
    assert f"--source: {out} holds no finished run of layer 15's mlp units (it has layer 1's sae-res-40)" in plain.stderr
    assert "set --source and --layer to one of those" in plain.stderr
    # a kind names no coder: the one layer with a run of those units
    negative = cli(home, "revise", "--out", str(out), "--source", "sae-res-40", "--unit", "8:-1", "--text", "x")
    assert negative.returncode == 2 and "--unit: '8:-1': this run's units have polarity +1 only" in negative.stderr
    assert "Flow run" not in negative.stderr, "refused before the flow starts"
    never = cli(home, "revise", "--out", str(out), "--layer", "1", "--source", "sae-res-40", "--unit", "7", "--text", "x")
    assert never.returncode == 2 and "--unit: unit 7 is not among the units this run explains" in never.stderr
    # another coder of the same kind at the same layer would take over this one's pointer and pages
    other = _write_sae(out.parent / "other_sae", seed=4)
    pointer = (out / "runs" / "layer_1.sae-res-40.json").read_bytes()
    taken = cli(home, "explain-layer", "--source", f"sae:{other}", "--units", "8-9", *common)
    assert taken.returncode == 2 and f"--source: {out} already holds layer 1's sae-res-40 latents of another coder" \
        in taken.stderr and "Flow run" not in taken.stderr, taken.stderr[-2000:]
    assert (out / "runs" / "layer_1.sae-res-40.json").read_bytes() == pointer
    # the neurons' run of the same layer is another run: asked for, it is named as missing
    missing = cli(home, "rescore", "--out", str(out), "--layer", "1")
    assert missing.returncode != 0 and "sae-res-40" in missing.stderr

    # published by source and layer, latents with their output side, Neuronpedia's id by source
    published = cli(home, "publish", "--out", str(out), "--to", str(out.parent / "ds"), "--license", "cc-by-4.0")
    assert published.returncode == 0, published.stderr[-3000:]
    ds = out.parent / "ds" / "data"
    assert [p.name for p in (ds / "scores").iterdir()] == ["sae-res-40"]
    units = pl.read_parquet(ds / "units" / "sae-res-40" / "layer_1.parquet")
    # the dead latent asked for is there with its statistics (which say it never fired), not explained
    assert sorted(units["unit"]) == [DEAD, 8, 9] and set(units["source"]) == {"sae-res-40"}
    assert (units["promotes"].list.len() == 10).all()
    assert units.filter(pl.col("unit") == DEAD)["frac_active"].to_list() == [0]
    import gzip

    with gzip.open(out.parent / "ds" / "neuronpedia" / "explanations" / "batch-0.jsonl.gz", "rt") as f:
        assert {json.loads(line)["layer"] for line in f} == {"1-sae-res-40"}

    # read back as a run of latents that rescore re-scores, as it re-scores the original
    imported = out.parent / "imported"
    assert cli(home, "import", "--from", str(out.parent / "ds"), "--out", str(imported)).returncode == 0
    back = cli(home, "rescore", "--out", str(imported), "--layer", "1", "--source", "sae-res-40", "--bootstrap", "60")
    assert back.returncode == 0, back.stderr[-4000:]
    assert "mean change: +0.000" in back.stderr and "cost of these scores: $0.0000" in back.stderr, "imported texts cost this run nothing"
    run = read_run(imported, 1, "sae-res-40")
    for stage in ("explanations", "scores"):
        table = pl.concat([pl.read_parquet(r["path"]) for r in run[stage]])
        assert set(table["source"]) == {"sae-res-40"} and set(table["unit"]) == {8, 9}, stage

    bad = cli(home, "explain-layer", "--source", f"sae:{tiny_sae}", "--layer", "2", *common)
    assert bad.returncode == 2 and "disagrees" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_explain_model_records_neurons_and_latents_in_one_task(tiny_llama_dir, prose_corpus, tiny_sae, tmp_path):
    """`explain-model --source mlp --source sae:PATH`: both sources' records from one recording task
    (one pass: see the test above), each folder with the key its own recording gets, then both explained."""
    from autoexplain.record import RecordConfig as Cfg

    out = tmp_path / "out"
    result = cli(tmp_path / "home", "explain-model", "--source", "mlp", "--source", f"sae:{tiny_sae}", "--layers", "1",
                 "--units", "8-9", "--shard-size", "2", "--model", tiny_llama_dir, "--corpus", str(prose_corpus),
                 "--tokens", "20000", "--k", "1", "--bootstrap", "50", "--window-len", "8", "--top-k", "8",
                 "--random", "6", "--out", str(out), "--site", "none")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("Task run 'record-sources-") > 0 and "Task run 'record-" not in \
        result.stderr.replace("Task run 'record-sources-", "")
    assert len(list((out / "windows").iterdir())) == 1
    for kind, source in (("mlp", "mlp"), ("sae-res-40", f"sae:{tiny_sae}")):
        run = read_run(out, 1, kind)
        assert run["flow"] == "explain-model" and set(pl.read_parquet(run["scores"][0]["path"])["unit"]) == {8, 9}
        subject = load_subject(tiny_llama_dir)
        windows = build_windows(subject, str(prose_corpus), out, window_len=8, max_tokens=20000, seed=0)
        alone = record_layers(subject, windows, Cfg([1], top_k=8, n_random=6), tmp_path / kind,
                              source=open_unit_source(source, tiny_llama_dir))
        assert run["records"]["key"] == alone.key


def test_unit_stats_carry_what_each_unit_promotes_and_suppresses(recorded, tiny_records, tiny_llama_dir):
    """Stored per unit as `output_side.output_tokens` gives it one unit at a time: a latent's decoder
    row, a neuron's output column, negated for the neuron's -1 polarity; with and without the norm."""
    from autoexplain.output_side import latent_direction, neuron_direction, output_tokens

    subject, source, _windows, ref = recorded
    names = subject.token_strings
    stats = pl.read_parquet(ref.stats_path(1)).row(3, named=True)
    want = output_tokens(subject.model, latent_direction(source.coder, 3))
    assert stats["promotes"] == names(want.top.ids) and stats["suppresses"] == names(want.bottom.ids)
    np.testing.assert_allclose(stats["promotes_logits"], want.top.values, rtol=1e-4)
    assert stats["promotes_normed"] == names(output_tokens(subject.model, latent_direction(source.coder, 3), normed=True).top.ids)

    records_dir, _out = tiny_records
    neuron = load_subject(tiny_llama_dir)
    rows = pl.read_parquet(records_dir / "layer_1.stats.parquet").filter(pl.col("unit") == 5)
    d = neuron_direction(neuron.projections[1], 5)
    for polarity in (1, -1):
        row = rows.filter(pl.col("polarity") == polarity).row(0, named=True)
        want = output_tokens(neuron.model, d * polarity)
        assert row["promotes"] == neuron.token_strings(want.top.ids)
        assert row["suppresses_normed"] == neuron.token_strings(output_tokens(neuron.model, d * polarity, normed=True).bottom.ids)


@pytest.mark.slow
def test_the_record_activations_flow_takes_a_source(prefect_results, tiny_llama_dir, prose_corpus, tiny_sae, tmp_path):
    """The coder's layer when none is given; weights changed at the same path record anew (the
    task's cache key holds the source's identity, not its path)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from autoexplain.flows.explain_layer import record_activations

    sae = shutil.copytree(tiny_sae, tmp_path / "sae")
    kw = dict(model=tiny_llama_dir, corpus="default", tokens=6000, out=str(tmp_path / "out"), source=f"sae:{sae}")
    first = record_activations(**kw)
    assert first["layers"] == [1] and first["source"] == "sae-res-40" and first["n_units"] == LATENTS
    t = load_file(sae / "sae_weights.safetensors")
    t["b_enc"] = t["b_enc"] - 0.1
    save_file(t, sae / "sae_weights.safetensors")
    second = record_activations(**kw)
    assert second["key"] != first["key"]
    with pytest.raises(UserError, match="parameter layers: layer 0 disagrees .* set layers to 1"):  # before any recording
        record_activations(**{**kw, "layers": [0]})


def test_the_sparse_reservoir_records_what_the_dense_one_does(recorded, tmp_path, monkeypatch):
    """Latents are recorded from their non-zero entries only; the records and statistics are those
    of the dense pass (`assert_same_recording`)."""
    subject, source, windows, ref = recorded
    monkeypatch.setattr(type(source), "sparse", False)
    cfg = RecordConfig([1], top_k=10, n_random=6, quantile_per_bin=1, reservoir=40)
    assert_same_recording(ref, record_layers(subject, windows, cfg, tmp_path, source=source), 1)


def assert_same_recording(sparse, dense, layer: int) -> None:
    """Records equal; statistics equal except mean and std, which the sparse pass sums in float64
    where the dense one sums each batch in float32 first, and skewness and kurtosis, which it takes
    from the reservoir's entries in float64: they agree to float32 rounding."""
    assert pl.read_parquet(sparse.records_path(layer)).equals(pl.read_parquet(dense.records_path(layer)))
    a, b = (pl.read_parquet(r.stats_path(layer)) for r in (sparse, dense))
    summed = ["mean", "std", "skewness", "kurtosis"]
    assert a.drop(summed).equals(b.drop(summed))
    for c in summed:
        np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=1e-5, atol=1e-5)  # float32 sums of O(1) moments
