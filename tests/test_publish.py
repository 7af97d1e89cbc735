"""`autoexplain publish` (issue 16, item 3): the latest runs of two layers, published as parquet tables
by source and layer with a dataset card, load offline with `datasets` (by config and by folder) and
with polars, and hold exactly the runs' rows. Bad input is one line and writes nothing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from autoexplain.publish import TABLES
from autoexplain.storage import read_manifest, read_run
from tests.test_cli import _one_error_line
from tests.test_cli_runs import cli, home  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def two_layers(home, tiny_llama_dir, prose_corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("publish") / "out"
    for layer in ("0", "1"):
        r = cli(home, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", layer,
                "--units", "0-3", "--tokens", "20000", "--k", "1", "--shard-size", "2", "--bootstrap", "20",
                "--window-len", "8", "--top-k", "8", "--random", "6", "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def run_table(out, stage: str, layer: int) -> pl.DataFrame:
    run = read_run(out, layer)
    return pl.concat([pl.read_parquet(r["path"]) for r in run[stage]])


@pytest.mark.slow
def test_a_published_dataset_loads_offline_and_holds_the_runs(home, two_layers, tmp_path, monkeypatch,  # noqa: F811
                                                              prose_corpus):
    to = tmp_path / "dataset"
    line = _one_error_line(cli(home, "publish", "--out", str(two_layers), "--to", str(to)))
    assert "license of the corpus" in line and "--license" in line and not to.exists(), line

    r = cli(home, "publish", "--out", str(two_layers), "--to", str(to), "--license", "cc-by-4.0")
    assert r.returncode == 0, r.stderr[-3000:]
    for table in TABLES:
        assert sorted(p.name for p in (to / "data" / table / "mlp").iterdir()) == ["layer_0.parquet", "layer_1.parquet"]
    text = (to / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["license"] == "cc-by-4.0" and [c["config_name"] for c in header["configs"]] == list(TABLES)
    for table in TABLES:
        assert f"### `{table}`" in text
    assert "| `value` | double | the score, null when undefined |" in text, "columns described from schemas/"
    corpus = next(line for line in text.splitlines() if line.startswith("- **Corpus:**"))
    assert corpus.startswith(f"- **Corpus:** `{Path(prose_corpus).name}`, "), corpus
    assert "Wikipedia" not in corpus and str(Path(prose_corpus).parent) not in corpus

    scores = pl.concat([run_table(two_layers, "scores", L) for L in (0, 1)])
    scanned = pl.scan_parquet(str(to / "data" / "scores" / "**" / "*.parquet")).collect()
    assert scanned.drop("source").sort(scanned.drop("source").columns).equals(scores.sort(scores.columns))
    assert scanned["source"].unique().to_list() == ["mlp"]

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    # The cache folder is passed, not set through HF_DATASETS_CACHE: `datasets` reads that once, at
    # its import, which an earlier test may have done; the user's cache then answered with the
    # tables of an older dataset published under the same folder name.
    cache = str(tmp_path / "hf-cache")
    by_config = datasets.load_dataset(str(to), "scores", split="train", cache_dir=cache)
    by_folder = datasets.load_dataset("parquet", data_dir=str(to / "data" / "scores"), split="train", cache_dir=cache)
    assert by_config.num_rows == by_folder.num_rows == scores.height
    explanations = datasets.load_dataset(str(to), "explanations", split="train", cache_dir=cache)
    assert set(explanations["method"]) == {"explainer", "token-lookup", "output-lookup", "shuffled"}
    exemplars = pl.read_parquet(to / "data" / "exemplars" / "mlp" / "layer_1.parquet")
    assert exemplars.height and (exemplars["tokens"].list.len() == exemplars["activations"].list.len()).all()
    units = pl.read_parquet(to / "data" / "units" / "mlp" / "layer_0.parquet")
    assert sorted(units["unit"].unique().to_list()) == [0, 1, 2, 3], "the explained units' statistics"
    assert (units["promotes"].list.len() == 10).all() and (units["suppresses_logits"].list.len() == 10).all()

    with gzip.open(to / "neuronpedia" / "explanations" / "batch-0.jsonl.gz", "rt") as f:
        pedia = [json.loads(line) for line in f]
    explained = scores.filter((pl.col("method") == "explainer") & (pl.col("polarity") == 1)).select("layer", "unit").unique()
    assert len(pedia) == explained.height and {p["layer"] for p in pedia} == {"0-mlp", "1-mlp"}
    assert set(pedia[0]) == {"modelId", "layer", "index", "description", "explanationModelName", "typeName"}

    # nothing of the machine it was made on: the model, corpus and output folders are the user's own
    tmp = str(Path(prose_corpus).parents[1])
    shown = [text, gzip.open(to / "neuronpedia" / "explanations" / "batch-0.jsonl.gz", "rt").read()]
    shown += [json.dumps(pl.read_parquet(p).select(pl.col(pl.String)).to_dicts()) for p in (to / "data").rglob("*.parquet")]
    assert not [s for s in shown if tmp in s], f"a local path ({tmp}) in the dataset"
    assert f'"model": "{Path(read_run(two_layers, 1)["params"]["model"]).name}"' in text
    assert header["pretty_name"] == f"autoexplain: {Path(read_run(two_layers, 1)['params']['model']).name} neurons, explained"

    imported = cli(home, "import", "--from", str(to), "--layer", "1", "--out", str(tmp_path / "named"))
    assert imported.returncode == 0, imported.stderr[-3000:]
    nowhere = cli(home, "rescore", "--out", str(tmp_path / "named"), "--layer", "1", "--bootstrap", "20",
                  "--scorers", "simulation,embedding")
    line = _one_error_line(nowhere)
    assert nowhere.returncode == 2 and "import" in line and "--model" in line, line
    wrong = _one_error_line(cli(home, "import", "--from", str(to), "--layer", "1", "--out", str(tmp_path / "wrong"),
                                "--model", str(Path(prose_corpus).parent)))
    assert wrong.startswith("error: --model:") and "not the model the dataset was recorded with" in wrong, wrong
    assert not (tmp_path / "wrong").exists()
    gone = _one_error_line(cli(home, "import", "--from", str(to), "--layer", "1", "--out", str(tmp_path / "wrong"),
                               "--model", str(tmp_path / "no-such-model")))
    assert gone.startswith("error: --model: cannot load model") and not (tmp_path / "wrong").exists(), gone
    imported = cli(home, "import", "--from", str(to), "--layer", "1", "--out", str(tmp_path / "again"),
                   "--model", read_run(two_layers, 1)["params"]["model"])
    assert imported.returncode == 0, imported.stderr[-3000:]
    back = pl.read_parquet(next((tmp_path / "again" / "explanations").glob("*/layer_1.parquet")))
    published = pl.read_parquet(to / "data" / "explanations" / "mlp" / "layer_1.parquet").filter(pl.col("method") == "explainer")
    assert back.sort("unit", "polarity")["text"].to_list() == published.sort("unit", "polarity")["text"].to_list()
    # the hard negatives run the model again on the imported windows: the card's subject fingerprint
    # lets them check it is the one (the model's name in its place was refused as another model).
    # The dataset holds the exemplars' windows alone, so none is left to be a hard negative.
    assert f'"subject_key": "{read_manifest(Path(read_run(two_layers, 1)["records"]["path"]))["inputs"]["subject"]}"' \
        in (to / "README.md").read_text()
    rescored = cli(home, "rescore", "--out", str(tmp_path / "again"), "--layer", "1", "--bootstrap", "20",
                   "--scorers", "simulation,embedding")
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    assert "embedding_auc@random" in set(run_table(tmp_path / "again", "scores", 1)["metric"])

    (to / "data" / "stale.txt").write_text("from an earlier publish")
    r = cli(home, "publish", "--out", str(two_layers), "--to", str(to), "--license", "cc-by-4.0", "--layers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (to / "data" / "stale.txt").exists(), "a republish replaces the whole set"
    assert [p.name for p in (to / "data" / "scores" / "mlp").iterdir()] == ["layer_1.parquet"]


@pytest.mark.slow
def test_the_card_says_the_tokens_recorded_and_describes_each_table_s_own_columns(home, two_layers, tmp_path,  # noqa: F811
                                                                                   prose_corpus):
    """The runs asked for 20,000 tokens of a corpus that holds fewer: the card said 20,000 while the
    `units` table said what was recorded. And `simulations.tokens` (a count) was described as the
    exemplars' `tokens` (the window's tokens), whatever its own schema says."""
    to = tmp_path / "dataset"
    assert cli(home, "publish", "--out", str(two_layers), "--to", str(to), "--license", "mit").returncode == 0
    text = (to / "README.md").read_text()
    recorded = pl.read_parquet(to / "data" / "units" / "mlp" / "layer_1.parquet")["n_tokens"].unique().to_list()
    assert len(recorded) == 1 and recorded[0] < 20_000, recorded
    corpus = next(line for line in text.splitlines() if line.startswith("- **Corpus:**"))
    assert corpus.startswith(f"- **Corpus:** `{Path(prose_corpus).name}`, {recorded[0]:,} tokens recorded "
                             "(20,000 asked) (the run's own corpus)"), corpus

    def rows(table: str) -> dict[str, str]:  # column -> its card row, in the table's own section
        section = text.split(f"### `{table}`")[1].split("### ")[0]
        return {line.split("`")[1]: line for line in section.splitlines() if line.startswith("| `")}

    assert rows("simulations")["tokens"] == "| `tokens` | int64 | the record's share of its request's tokens |"
    assert rows("exemplars")["tokens"].endswith("| the window's tokens, each decoded alone |")


@pytest.mark.slow
def test_bad_publish_input_is_one_line(home, two_layers, tmp_path):  # noqa: F811
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for args, needle in (((str(tmp_path / "nothing"), tmp_path / "d1"), "holds no finished explain-layer run"),
                         ((str(two_layers), foreign), "is not empty and holds no dataset that publish wrote"),
                         ((str(two_layers), tmp_path / "d2", "--layers", "7"), "no finished run of layer(s) [7]")):
        out, to, *rest = args
        line = _one_error_line(cli(home, "publish", "--out", out, "--to", str(to), "--license", "mit", *rest))
        assert needle in line, line
    assert (foreign / "notes.txt").read_text() == "keep me" and not (tmp_path / "d2").exists()


@pytest.mark.slow
def test_the_publish_flow(prefect_results, two_layers, tmp_path):
    import logging

    from autoexplain.flows.publish import publish_dataset

    state = publish_dataset(out=str(two_layers), to=str(tmp_path / "ds"), layers=[0], license="mit", return_state=True)
    assert state.is_completed() and state.result() == str(tmp_path / "ds")
    assert [p.name for p in (tmp_path / "ds" / "data" / "units" / "mlp").iterdir()] == ["layer_0.parquet"]
    state = publish_dataset(out=str(two_layers), to=str(tmp_path / "ds2"), return_state=True)
    assert state.is_failed() and "license of the corpus" in state.message and "\n" not in state.message
    # the run's log as the UI shows it, read back from the API (the process's logging setup varies)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    for handler in {h for name in ("prefect.flow_runs", "prefect.task_runs") for h in logging.getLogger(name).handlers
                    if isinstance(h, APILogHandler)}:
        handler.flush()  # the logs go to the API in the background: sent now, before they are read
    with get_client(sync_client=True) as client:
        logged = [g.message for g in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))]
    assert any(state.message in m for m in logged), logged
    assert not any("Traceback" in m for m in logged), "the run log says the line alone"


def test_a_dataset_shows_specs_and_models_without_their_place(tmp_path):
    from autoexplain.publish import public_model
    from autoexplain.registry import public_spec

    assert public_spec("openai:gpt-4o@http://10.0.0.5:8000/v1#MY_KEY") == "openai:gpt-4o"
    assert public_spec("with-outputs:openai:meta-llama/Llama-3-8B@https://h:1/v1") == "with-outputs:openai:meta-llama/Llama-3-8B"
    assert public_spec("simulation,detection:openai:x@http://h/v1#K,embedding") == "simulation,detection:openai:x,embedding"
    assert public_spec("all-at-once:local:/home/me/models/m.gguf") == "all-at-once:local:m.gguf"
    assert public_spec("sae:/home/me/coders/res_l1/") == "sae:res_l1"
    assert [public_spec(s) for s in ("embedding", "chat-json:openai:gpt-4o-mini", "local")] == \
        ["embedding", "chat-json:openai:gpt-4o-mini", "local"]
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert public_model(str(snapshot)) == "HuggingFaceTB/SmolLM2-135M"
    assert public_model(str(tmp_path / "hub")) == "hub"
    assert [public_model(m) for m in ("smollm2", "EleutherAI/pythia-70m")] == ["smollm2", "EleutherAI/pythia-70m"]
