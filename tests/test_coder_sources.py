"""A sparse coder given as a unit source, as users give it: by a path relative to where they are,
to commands that record, to `record` with its own flags, to explain-model with layers it may lack."""

from __future__ import annotations

import shutil

import pytest

from autoexplain.errors import UserError
from autoexplain.record import RecordConfig, build_windows, record_layers
from autoexplain.source_coder import open_unit_source, recorded_source
from autoexplain.storage import read_manifest
from autoexplain.subject import load_subject
from tests.test_sae_units import _write_sae


@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory):
    return _write_sae(tmp_path_factory.mktemp("sae") / "res_l1")


def test_a_coder_given_by_a_relative_path_is_found_from_anywhere_later(tiny_llama_dir, prose_corpus, tiny_sae,
                                                                       tmp_path, monkeypatch):
    """The recording names its coder by an absolute path: the hard negatives of a later rescore, run
    from another directory, read the same coder; explain-model's plan keeps it absolute too."""
    from autoexplain.model_plan import explain_model

    here = tmp_path / "here"
    coder = shutil.copytree(tiny_sae, here / "coders" / "res_l1")
    monkeypatch.chdir(here)
    subject, out = load_subject(tiny_llama_dir), tmp_path / "out"
    windows = build_windows(subject, str(prose_corpus), out, window_len=8, seed=0)
    cfg = RecordConfig([1], top_k=10, n_random=6, quantile_per_bin=1, reservoir=40)
    made = record_layers(subject, windows, cfg, out, source=open_unit_source("sae:coders/res_l1", tiny_llama_dir))
    plan = explain_model({"model": tiny_llama_dir, "sources": ["sae:coders/res_l1"], "out": str(tmp_path / "o2")})

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert read_manifest(made.directory)["params"]["source_spec"] == f"sae:{coder}"
    assert [spec for spec, _ in plan.sources] == [f"sae:{coder}"]
    assert recorded_source(made.directory, tiny_llama_dir, 1).kind == "sae-res-40"
    with pytest.raises(UserError, match="no longer at"):  # relative to here, it names nothing
        recorded_source(made.directory, tiny_llama_dir, 1, now="sae:coders/res_l1")


def _record(*args: str):
    """The `record` stage command alone, as a process (no Prefect in it)."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "autoexplain.cli", "record", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}, timeout=600)


def test_record_names_its_own_layers_flag_when_the_coder_reads_another(tiny_llama_dir, tiny_sae, tmp_path):
    from tests.test_cli import _one_error_line

    base = ["--model", tiny_llama_dir, "--source", f"sae:{tiny_sae}", "--out", str(tmp_path / "out")]
    line = _one_error_line(_record(*base, "--layers", "0"))
    assert line.startswith("error: --layers: layer 0 disagrees with") and "set --layers to 1, or leave it out" in line
    assert "--layer " not in line, "record has no --layer"
    line = _one_error_line(_record(*base, "--layers", "0,1"))
    assert line.startswith("error: --layers: a coder reads one layer, this names 2")
    assert not (tmp_path / "out").exists()


def test_explain_model_refuses_a_layer_a_sparsify_run_has_no_coder_for(tiny_llama_dir, tmp_path):
    """Without --layers each coder is explained at its own layer; a layer asked for that a source
    cannot read is one line naming both, never a layer silently left out."""
    import torch

    from autoexplain.model_plan import explain_model
    from autoexplain.preflight import cli_flag
    from tests.test_sae import write_sparsify
    from tests.test_sae_units import D_MODEL

    g = torch.Generator().manual_seed(0)
    for layer in (0, 2):
        write_sparsify(tmp_path / "run" / f"layers.{layer}", {"W_enc": torch.randn(D_MODEL, 48, generator=g),
                       "b_enc": torch.zeros(48), "W_dec": torch.randn(48, D_MODEL, generator=g), "b_dec": torch.zeros(D_MODEL)})
    run = f"sae:{tmp_path / 'run'}"

    def layers(sources, asked):
        plan = explain_model({"model": tiny_llama_dir, "sources": sources, "layers": asked}, cli_flag)
        return sorted((part.layer, part.source.kind) for _, parts in plan.sources for part in parts)

    assert layers([run], None) == [(0, "sae-res-48"), (2, "sae-res-48")]
    assert layers([run], "0,2") == [(0, "sae-res-48"), (2, "sae-res-48")]
    with pytest.raises(UserError) as e:
        layers([run], "0,1")
    assert str(e.value).startswith(f"--layers: {run} holds no coder for layer 1 (it has layers.0, layers.2)")
    assert "pick layers it has (0, 2)" in str(e.value)
    with pytest.raises(UserError, match=f"--layers: no source reads layer 2 \\(sae:{tmp_path}/run/layers.0 reads layer 0\\)"):
        layers([f"{run}/layers.0"], "0,2")
    assert layers(["mlp", f"{run}/layers.0"], "0,2") == [(0, "mlp"), (0, "sae-res-48"), (2, "mlp")]


def _named(folder, name, flat: bool = False):
    """The tiny SAE as trained on the model `name`, its config's 6.x metadata or older flat field."""
    import json

    coder = shutil.copytree(_write_sae(folder.parent / f"{folder.name}-src"), folder)
    cfg = json.loads((coder / "cfg.json").read_text())
    if flat:
        del cfg["metadata"]
        cfg.update(model_name=name, hook_name="blocks.1.hook_resid_post", activation_fn_str="relu")
    else:
        cfg["metadata"]["model_name"] = name
    (coder / "cfg.json").write_text(json.dumps(cfg))
    return coder


def test_a_coder_trained_on_another_model_family_is_read_with_one_warning(tiny_llama_dir, tmp_path, caplog):
    """Its width and layer fit the tiny Llama: read anyway, with a warning said once, when its config
    plainly names another family; never when the name says nothing or spells the same model."""
    import logging

    from autoexplain.sae import families, model_dims

    caplog.set_level(logging.WARNING, logger="autoexplain.sae")
    gemma = _named(tmp_path / "gemma", "google/gemma-2-2b")
    for _ in range(2):
        assert open_unit_source(f"sae:{gemma}", tiny_llama_dir).kind == "sae-res-40"
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"warning: {gemma} was trained on 'google/gemma-2-2b', which names another model than "
                    f"{tiny_llama_dir}; its width and layer fit, so it is read anyway: check that it belongs to this model"]
    caplog.clear()
    pythia = _named(tmp_path / "pythia", "pythia-70m-deduped", flat=True)  # SAELens before 6.0
    open_unit_source(f"sae:{pythia}", tiny_llama_dir)
    assert len(caplog.records) == 1 and "'pythia-70m-deduped'" in caplog.records[0].getMessage()
    caplog.clear()
    for i, name in enumerate(("tiny", "", tiny_llama_dir, "meta-llama/Llama-3.2-1B", "my-org/finetuned-model")):
        open_unit_source(f"sae:{_named(tmp_path / f'same{i}', name)}", tiny_llama_dir)
    assert caplog.records == [], "a name that says nothing, or the same family, is no warning"
    # the embedded subject by every name it goes by, and the name train-sae writes for it
    from autoexplain import defaults

    ours = families(*model_dims("smollm2").names)
    for name in ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", defaults.resolve_model("smollm2"), "SmolLM2-135M"):
        assert families(name) and families(name) & ours, name


def test_a_rerun_of_a_coders_units_at_another_layer_says_the_layers_disagree(tiny_sae, tmp_path):
    """rescore/revise with a coder that reads layer 1 and a layer of 2: the layers disagree (as
    explain-layer says), not "no finished run of layer 2", which would send the user looking for one."""
    from autoexplain.preflight import cli_flag, flow_name
    from autoexplain.run_lookup import run_of

    for spell, needle in ((cli_flag, "--layer: layer 2 disagrees with the coder sae:"),
                          (flow_name, "parameter layer: layer 2 disagrees with the coder sae:")):
        with pytest.raises(UserError) as refused:
            run_of(str(tmp_path), 2, f"sae:{tiny_sae}", spell)
        line = str(refused.value)
        assert line.startswith(needle) and "which reads layer 1" in line, line
        assert f"set {spell('layer').split()[-1]} to 1, or leave it out" in line, line
