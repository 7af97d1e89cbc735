"""A local model given by path is known in content keys by its content, not by where it lies: the
same weights in two folders of other names are one key, and the second run reuses what the first
made (also two machines that keep the model at different paths, under one URL root); other weights
under the same folder name are another key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autoexplain.counters import since, snapshot
from autoexplain.layer import run_explain, run_simulate
from autoexplain.pipeline import ExplainConfig
from autoexplain.record import RecordConfig, build_windows, record_layers
from autoexplain.storage import read_manifest
from autoexplain.subject import load_subject

EXPLAIN = ExplainConfig(k=2, max_tokens=6)


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tmp_path_factory):
    """(alpha, beta: a copy of alpha in a folder of another name, other: alpha's folder name over
    weights that differ in one value)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("models")
    alpha = shutil.copytree(tiny_llama_dir, root / "alpha")
    beta = shutil.copytree(tiny_llama_dir, root / "elsewhere" / "beta")
    other = shutil.copytree(tiny_llama_dir, root / "other" / "alpha")
    weights = other / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if n.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    return str(alpha), str(beta), str(other)


def _record(model: str, corpus: Path, out: Path):
    subject = load_subject(model)
    windows = build_windows(subject, str(corpus), out, window_len=8, seed=0)
    cfg = RecordConfig([1], top_k=12, n_random=9, quantile_per_bin=1, reservoir=48)
    return windows, record_layers(subject, windows, cfg, out)


def test_the_same_weights_in_another_folder_are_recorded_once(models, prose_corpus, tmp_path):
    alpha, beta, other = models
    windows, records = _record(alpha, prose_corpus, tmp_path)
    before = snapshot()
    windows_b, records_b = _record(beta, prose_corpus, tmp_path)
    assert (windows_b.key, records_b.key) == (windows.key, records.key)
    assert since(before).get("subject_forward", 0) == 0, "the copy's recording was made again"
    assert len(list((tmp_path / "records").iterdir())) == 1

    before = snapshot()
    _, records_other = _record(other, prose_corpus, tmp_path)
    assert records_other.key != records.key, "other weights under the same folder name share a key"
    assert since(before)["subject_forward"] > 0


def test_a_local_explainer_and_simulator_in_another_folder_are_the_same_keys(models, tiny_records, tmp_path):
    alpha, beta, other = models
    records_dir, _ = tiny_records
    x = run_explain(records_dir, 1, tmp_path, [0, 1], explainer=f"local:{alpha}", cfg=EXPLAIN)
    s = run_simulate(records_dir, x, tmp_path, simulator=f"all-at-once:local:{alpha}")
    assert read_manifest(x.directory)["params"]["explainer"] == f"local:{alpha}", "people see the path as given"

    before = snapshot()
    x_b = run_explain(records_dir, 1, tmp_path, [0, 1], explainer=f"local:{beta}", cfg=EXPLAIN)
    s_b = run_simulate(records_dir, x_b, tmp_path, simulator=f"all-at-once:local:{beta}")
    assert (x_b.key, s_b.key) == (x.key, s.key)
    counts = since(before)
    assert counts.get("llm_requests", 0) == 0 and counts.get("simulate", 0) == 0, f"the copy recomputed {counts}"

    before = snapshot()
    x_o = run_explain(records_dir, 1, tmp_path, [0, 1], explainer=f"local:{other}", cfg=EXPLAIN)
    s_o = run_simulate(records_dir, x, tmp_path, simulator=f"all-at-once:local:{other}")
    assert x_o.key != x.key and s_o.key != s.key
    assert since(before)["simulate"] > 0


def test_a_scorer_is_keyed_by_its_local_model_content_and_hub_or_server_llms_by_name(models):
    from autoexplain.classify_stage import scorer_identity
    from autoexplain.registry import keyed_spec, parse_explainer, parse_simulator

    alpha, beta, other = models
    assert scorer_identity(f"detection:local:{alpha}") == scorer_identity(f"detection:local:{beta}")
    assert scorer_identity(f"detection:local:{alpha}") != scorer_identity(f"detection:local:{other}")
    for spec in ("local:HuggingFaceTB/SmolLM2-135M", "openai:gpt-4o-mini@http://127.0.0.1:9/v1", "embedding"):
        assert keyed_spec(parse_explainer(spec)) == spec
    assert keyed_spec(parse_simulator("all-at-once:openai:m@http://127.0.0.1:9/v1")) == "all-at-once:openai:m@http://127.0.0.1:9/v1"


def test_records_keyed_by_folder_name_before_still_find_their_model_for_negatives(models, prose_corpus, tmp_path):
    """A recording made before keys left the path's name out holds 'NAME:DIGEST': the model it was
    made with is still recognised (hard negatives load it), and another one is still refused."""
    import json

    from autoexplain.errors import UserError
    from autoexplain.negatives import run_negatives

    alpha, _beta, other = models
    _, records = _record(alpha, prose_corpus, tmp_path)
    manifest = records.directory / "manifest.json"
    data = json.loads(manifest.read_text())
    data["inputs"]["subject"] = f"alpha:{data['inputs']['subject']}"
    manifest.write_text(json.dumps(data))
    assert (Path(run_negatives(records.directory, 1, tmp_path, alpha, [(0, 1)])) / "manifest.json").is_file()
    with pytest.raises(UserError, match=r"is not the one .* was recorded with \(changed since, or another\)"):
        run_negatives(records.directory, 1, tmp_path / "again", other, [(0, 1)])
