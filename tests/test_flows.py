"""The Prefect flows: caching by content, proved by counting model and LLM calls; resume after a
crash; permanent errors fail fast; contracts stop bad data."""

from __future__ import annotations

import shutil
import socket
import threading
from contextlib import contextmanager

import pytest

from autoexplain.counters import since, snapshot
from autoexplain.errors import UserError


@pytest.fixture
def run(prefect_results, tiny_llama_dir, prose_corpus, tmp_path):
    from autoexplain.flows.explain_layer import explain_layer

    base = dict(layer=1, units="0-5", model=tiny_llama_dir, corpus=str(prose_corpus), tokens=100_000,
                explainer=f"local:{tiny_llama_dir}", simulator="embedding", k=2, shard_size=4, n_boot=50,
                out=str(tmp_path / "out"), window_len=8, top_k=8, n_random=6)

    def go(**overrides):
        before = snapshot()
        result = explain_layer(**{**base, **overrides})
        return result, since(before)

    return go


def _prompts_copy(tmp_path, monkeypatch, name, extra):
    from autoexplain.explain import PACKAGE_PROMPTS

    copy = tmp_path / "prompts"
    if not copy.exists():
        shutil.copytree(PACKAGE_PROMPTS, copy)
        monkeypatch.setenv("AUTOEXPLAIN_PROMPTS", str(copy))
    (copy / name).write_text((copy / name).read_text() + extra)


def test_second_identical_run_recomputes_nothing(run):
    first, counts = run()
    assert counts["subject_forward"] > 0 and counts["llm_requests"] > 0 and counts["simulate"] > 0
    again, counts = run()
    assert counts == {}, f"a second identical run recomputed {counts}"
    assert sorted(s["key"] for s in again["scores"]) == sorted(s["key"] for s in first["scores"])


def test_a_corpus_edited_in_place_is_recorded_again(run, tmp_path, prose_corpus):
    """Prefect's task cache keys a recording by the corpus's content, as the store does: the same
    path holding other text must not answer with the recording of what it held before."""
    corpus = tmp_path / "edited.jsonl"
    corpus.write_text(prose_corpus.read_text())
    first, _ = run(corpus=str(corpus), explainer="embedding", units="0-1")
    corpus.write_text(corpus.read_text() + '{"text": "The mill stopped when the river froze in the long winter."}\n')
    again, counts = run(corpus=str(corpus), explainer="embedding", units="0-1")
    assert counts.get("subject_forward", 0) > 0, "the edited corpus was recorded"
    assert again["records"]["key"] != first["records"]["key"]


def test_explainer_prompt_edit_reruns_explain_simulate_score_never_recording(run, tmp_path, monkeypatch):
    run()
    _prompts_copy(tmp_path, monkeypatch, "explainer_system.txt", " Be brief.")
    _, counts = run()
    assert counts.get("subject_forward", 0) == 0, "recording must not rerun"
    assert counts["llm_requests"] > 0 and counts["simulate"] > 0 and counts["score_units"] > 0


def test_simulator_prompt_edit_reruns_simulate_and_score_only(run, tmp_path, monkeypatch, tiny_llama_dir):
    sim = f"all-at-once:local:{tiny_llama_dir}"
    run(simulator=sim)
    _prompts_copy(tmp_path, monkeypatch, "simulator_system.txt", " Think carefully.")
    _, counts = run(simulator=sim)
    assert counts.get("subject_forward", 0) == 0 and counts.get("llm_requests", 0) == 0
    assert counts["simulate"] > 0 and counts["score_units"] == 12


def test_embedding_simulator_prompt_edit_is_seen_by_the_same_process(run, tmp_path, monkeypatch):
    """The default simulator's prompt is its class descriptions. The simulator object is cached per
    process; an edit must still reach it (this once returned the old simulations, cached)."""
    import json

    first, _ = run()
    first_hashes = _prompt_hashes(first)
    _prompts_copy(tmp_path, monkeypatch, "embedding_simulator.json", "")
    path = tmp_path / "prompts" / "embedding_simulator.json"
    prompt = json.loads(path.read_text())
    prompt["classes"]["digit"] = "a number or a year written in digits"
    path.write_text(json.dumps(prompt))
    second, counts = run()
    assert counts.get("subject_forward", 0) == 0 and counts.get("llm_requests", 0) == 0
    assert set(s["key"] for s in second["scores"]).isdisjoint(s["key"] for s in first["scores"])
    # Units whose texts' class gates the edit moves are simulated again; the rest are read back
    # (tests/test_memo.py checks that this writes what a run without memos writes).
    assert counts["simulate"] > 0 and 0 < counts["score_units"] < 12, counts
    hashes = _prompt_hashes(second)
    assert len(hashes) == 1 and hashes.isdisjoint(first_hashes), "rows read back carry the edited prompt's hash"


def _prompt_hashes(result) -> set[str]:
    from pathlib import Path

    import polars as pl

    from autoexplain.storage import read_run

    refs = read_run(Path(result["out"]), 1)["simulations"]
    return {h for ref in refs for h in pl.read_parquet(ref["path"])["prompt_hash"].unique()}


def _explanations(result) -> "pl.DataFrame":
    from pathlib import Path

    import polars as pl

    from autoexplain.storage import read_run

    out = Path(result["out"])
    refs = read_run(out, 1)["explanations"]
    return pl.concat([pl.read_parquet(r["path"]) for r in refs])


def test_human_revision_resimulates_only_that_unit(run):
    import polars as pl

    first, _ = run()
    before = _explanations(first)
    second, counts = run(revisions={"2:1": "numbers written in digits"})
    joined = before.join(_explanations(second), on=["unit", "polarity", "method"], suffix="_new")
    changed = joined.filter(pl.col("text") != pl.col("text_new"))
    assert changed.select("unit", "polarity", "method", "text_new", "explainer_new").rows() == [
        (2, 1, "explainer", "numbers written in digits", "human")]
    assert counts.get("subject_forward", 0) == 0 and counts.get("llm_requests", 0) == 0
    # Unit 2+: its one candidate on valid, then it and its two baselines (token-lookup and its
    # output-side twin) on held-out records; plus the one shuffled control that now carries the
    # revised text. Nothing else.
    assert counts["simulate"] == 5
    assert counts["score_units"] == 2


def test_crashed_shard_resumes_where_it_stopped(run, fault_server):
    # 8 answers, then permanent errors for the next batch of 4 (in flight together), then healthy.
    # At concurrency 1 the batches of 8 units go one after another, so the script's order is theirs
    # (at a higher concurrency the finished batches are kept just the same, in whatever order).
    server = fault_server(fail_with=[200] * 8 + [400] * 4, then_status=200)
    explainer = f"openai:canned@{server.base_url}"
    with pytest.raises(Exception, match="400"):
        run(explainer=explainer, k=1, shard_size=12, concurrency=1)
    # The first 400 ends the batch; whether its other requests were sent before it did is a race.
    crashed = len(server.requests)
    assert 8 < crashed <= 12
    server.script.clear()  # healthy from now on, however many of the 400s were used
    run(explainer=explainer, k=1, shard_size=12, concurrency=1)
    assert len(server.requests) - crashed == 4, "only the 4 units the crash left unexplained are asked again"


BAD_PARAMETERS = [
    (dict(layer=7), "parameter layer: layer 7 is out of range"),
    (dict(units="0,99"), "parameter units: unit 99 is out of range"),
    (dict(units="5-2"), "parameter units: the unit range '5-2' runs backwards"),
    (dict(units=" "), "parameter units: ' ' names no unit"),
    (dict(units="x"), "parameter units: cannot read units 'x'"),
    (dict(units="0-"), "parameter units: cannot read units '0-': '0-' is neither a unit nor a range FROM-TO"),
    (dict(window_len=257), "parameter window_len 257 is longer than the model's context of 256 positions — "
                           "give window_len 256 or less"),
    (dict(explainer="openai:m@notaurl"), "parameter explainer: 'openai:m@notaurl': the server address after '@' has no http://"),
    (dict(shard_size=0), "parameter shard_size: must be at least 1"),
    (dict(tokens=0), "parameter tokens: must be at least 1"),
    (dict(k=0), "parameter k: must be at least 1"),
    (dict(n_boot=0), "parameter n_boot: must be at least 1"),
    (dict(top_k=0), "parameter top_k: must be at least 1"),
    (dict(n_random=-1), "parameter n_random: must be at least 0"),
    (dict(window_len=1), "parameter window_len: must be at least 2"),
    (dict(simulator="nonsense"), "parameter simulator: unknown simulator 'nonsense'"),
    (dict(simulator="chat-json"), "parameter simulator: chat-json needs an LLM"),
    (dict(simulator="all-at-once/0:openai:m@http://127.0.0.1:9/v1"),
     "parameter simulator: 'all-at-once/0:openai:m@http://127.0.0.1:9/v1': records per request must be a whole "
     "number of at least 1, got '0' — write 'all-at-once:openai:m@http://127.0.0.1:9/v1' for one record per request"),
    (dict(explainer="bogus"), "parameter explainer: unknown explainer 'bogus'"),
    (dict(explainer="openai:m@http://127.0.0.1:9/v1"), "parameter explainer: the LLM server at http://127.0.0.1:9/v1 is not reachable"),
    (dict(simulator="all-at-once:openai:m@http://127.0.0.1:9/v1"), "parameter simulator: the LLM server"),
    (dict(model="/no/such/model"), "parameter model: model folder /no/such/model does not exist"),
    (dict(corpus="/no/such/corpus.txt"), "parameter corpus: corpus /no/such/corpus.txt does not exist"),
    (dict(out="/etc/hostname/out"), "parameter out: cannot write under /etc/hostname/out"),
    (dict(results="/etc/hostname/results"), "parameter results: cannot write under /etc/hostname/results"),
    (dict(revisions={"x:1": "text"}), "parameter revisions: cannot read the revision key 'x:1'"),
    (dict(revisions={"2:5": "text"}), "parameter revisions: cannot read the revision key '2:5'"),
    (dict(revisions={"40:1": "text"}), "parameter revisions: unit 40 is not among the units this run explains"),
    (dict(revisions={"2:-1": " "}), "parameter revisions: the revision of '2:-1' is empty"),
    (dict(concurrency=0), "parameter concurrency: must be at least 1, got 0"),
    (dict(rpm=-1.0), "parameter rpm: must be more than 0"),
    (dict(tpm=0.0), "parameter tpm: must be more than 0 tokens per minute"),
    (dict(retries=-1), "parameter retries: must be at least 0, got -1"),
    (dict(dask="tcp://127.0.0.1:9"), "parameter dask: no dask scheduler answers at tcp://127.0.0.1:9"),
    (dict(dask="scheduler"), "parameter dask: 'scheduler' is not a dask scheduler address"),
]


@pytest.mark.parametrize("bad,message", BAD_PARAMETERS, ids=[next(iter(b)) + "=" + str(next(iter(b.values()))) for b, _ in BAD_PARAMETERS])
def test_every_bad_parameter_fails_before_any_work(run, tmp_path, bad, message):
    """One line naming the flow parameter, as the run's Failed state message, with nothing recorded,
    loaded or written (the time to failure is the preflight's: no model is loaded before it)."""
    from autoexplain.flows.explain_layer import explain_layer
    from autoexplain.tasks import stages

    loaded = stages._subject.cache_info().currsize
    with pytest.raises(UserError) as caught:
        run(**bad)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value) and "--" not in str(caught.value).split(" — ")[0], "names the parameter, not a CLI flag"
    assert stages._subject.cache_info().currsize == loaded, "no subject was loaded"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"


def test_a_corpus_without_its_text_field_names_the_flow_parameter_before_any_work(run, tmp_path):
    """A deployment's user is told the flow parameter to set, not the CLI's flag, before any work."""
    from autoexplain.tasks import stages

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"body": "The river ran quietly past the old mill."}\n' * 50)
    loaded = stages._subject.cache_info().currsize
    with pytest.raises(UserError) as caught:
        run(corpus=str(corpus))
    assert str(caught.value) == (f"{corpus}:1 has no string field 'text' — "
                                 "name the field that holds the text with parameter text_field")
    assert stages._subject.cache_info().currsize == loaded, "no subject was loaded"
    assert not (tmp_path / "out").exists(), "nothing written"


@contextmanager
def not_a_scheduler(silent: bool = False):
    """The address of a real loopback listener that is no dask scheduler: it closes each connection
    it takes (as a server of another protocol does), or says nothing on it (`silent`)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def take():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if silent:
                held.append(conn)
            else:
                conn.close()

    threading.Thread(target=take, daemon=True).start()
    try:
        yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_a_dask_address_where_something_else_listens_names_the_flow_parameter_before_any_work(run, tmp_path):
    """A listener that is no dask scheduler passed the preflight's one connection: the layer was
    recorded before prefect-dask found out, and a silent one kept it waiting for minutes. The
    flow's own check (a deployment's run) names its parameter, as the CLI names its flag
    (tests/test_cli_runs.py)."""
    for silent in (False, True):
        with not_a_scheduler(silent) as address, pytest.raises(UserError) as caught:
            run(dask=address)
        message = str(caught.value)
        assert message.startswith(f"parameter dask: something listens at {address}, but no dask scheduler answers"), message
        assert "\n" not in message and "--dask" not in message
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing recorded"


def test_a_parameter_error_the_run_finds_after_the_cli_check_names_the_flag(prefect_results, tiny_llama_dir,
                                                                           prose_corpus, tmp_path):
    """What a run finds about a parameter after the command's own check passed (a dask scheduler
    gone since: here the check is skipped, so the flow's own finds it) is said with the command's
    flag: the CLI printed the flow's "parameter dask: ..." for it."""
    from autoexplain.flows.cli import _run_flow

    params = dict(layer=1, units="0-1", model=tiny_llama_dir, corpus=str(prose_corpus), tokens=20_000,
                  explainer="embedding", simulator="embedding", scorers="simulation", k=2, shard_size=4, n_boot=50,
                  window_len=8, top_k=8, n_random=6, out=str(tmp_path / "out"), results=None, concurrency=None,
                  rpm=None, tpm=None, retries=None, cache=True, budget=None, source="mlp")
    with not_a_scheduler() as address, pytest.raises(UserError) as caught:
        _run_flow("explain_layer", {**params, "dask": address}, check=lambda: None)
    line = str(caught.value)
    assert line.startswith(f"--dask: something listens at {address}, but no dask scheduler answers"), line
    assert "parameter dask" not in line


def test_failed_state_message_is_the_one_line(run, prefect_results, tiny_llama_dir, prose_corpus, tmp_path):
    from autoexplain.flows.explain_layer import explain_layer

    state = explain_layer(layer=99, model=tiny_llama_dir, corpus=str(prose_corpus), out=str(tmp_path / "o"),
                          return_state=True)
    assert state.is_failed()
    assert state.message.startswith("parameter layer: layer 99 is out of range") and "\n" not in state.message


def test_revise_without_a_run_or_a_revision_is_one_line(prefect_results, tmp_path):
    from autoexplain.flows.explain_layer import revise

    state = revise(out=str(tmp_path), layer=1, revisions={"1": "x"}, return_state=True)
    assert state.is_failed() and state.message.startswith("parameter out: ") and "\n" not in state.message
    assert not any(tmp_path.iterdir()), "nothing written"


def test_parameters_are_validated(run):
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError):
        run(layer="middle")


def test_one_unit_or_one_layer_is_a_number_as_a_deployment_sends_it(tiny_llama_dir):
    """`prefect deployment run ... --param units=5` sends the JSON number 5, not "5"."""
    from autoexplain import preflight
    from autoexplain.flows.explain_layer import explain_layer
    from autoexplain.flows.explain_model import explain_model

    assert explain_layer.validate_parameters({"units": 5})["units"] == 5
    assert explain_model.validate_parameters({"layers": 15, "units": 7})["layers"] == 15
    plan = preflight.explain_layer({"units": 5, "model": tiny_llama_dir, "layer": 1})
    assert plan.units == [5]


def test_a_run_with_unanswered_requests_ends_in_a_state_named_incomplete(tmp_path):
    """What a deployment's run shows (no exit code there): its data is still the run's result."""
    import json

    from autoexplain.flows.steps import finished

    def scores(key: str, unanswered: int = 0) -> dict:
        d = tmp_path / "out" / "scores" / key
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"stage": "scores", "key": key, "inputs": {},
                                                     **({"unanswered": unanswered} if unanswered else {})}))
        return {"path": str(d / "layer_1.parquet"), "key": key, "layer": 1}

    final = {"scores": [scores("a")], "out": "x"}
    assert finished(final) == {**final, "unanswered": 0}, "the result as it was, with its count"
    state = finished({"scores": [scores("b"), scores("c", 12)], "out": "x"})
    assert state.name == "Incomplete" and state.is_completed()
    assert state.message.startswith("12 results got no LLM answer") and state.result()["out"] == "x"
    assert state.result()["unanswered"] == 12, "what the CLI's exit line reads"


def test_record_activations_refuses_a_model_whose_context_is_shorter_than_its_windows(run, tmp_path, smollm2_tokenizer):
    """The flow's windows are 64 tokens and it has no window_len parameter to change: the line names
    the model and where the window can be set, before any work."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from autoexplain.flows.explain_layer import record_activations
    from autoexplain.tasks import stages

    short = tmp_path / "gpt2-32"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=32, n_inner=40, n_layer=2, n_head=4,
                               n_positions=32)).save_pretrained(short)
    smollm2_tokenizer.save_pretrained(short)
    loaded = stages._subject.cache_info().currsize
    with pytest.raises(UserError) as caught:
        record_activations(model=str(short), corpus="default", tokens=2000, out=str(tmp_path / "out"))
    assert str(caught.value) == ("parameter model: its context of 32 positions is shorter than this flow's 64-token "
                                 "windows — record it with explain-layer, whose parameter window_len sets the window")
    assert stages._subject.cache_info().currsize == loaded and not (tmp_path / "out").exists()
