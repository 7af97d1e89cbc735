"""The Prefect flows: caching by content, proved by counting model and LLM calls; resume after a
crash; permanent errors fail fast; contracts stop bad data."""

from __future__ import annotations

import shutil
import time

import pytest

from autoexplain.counters import since, snapshot
from autoexplain.errors import UserError


@pytest.fixture(scope="module")
def prefect_isolated(tmp_path_factory):
    """Own database AND own result storage: the harness alone does not isolate results."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}):
        yield results


@pytest.fixture
def run(prefect_isolated, tiny_llama_dir, prose_corpus, tmp_path):
    from flows.explain_layer import explain_layer

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
    _prompts_copy(tmp_path, monkeypatch, "embedding_simulator.json", "")
    path = tmp_path / "prompts" / "embedding_simulator.json"
    prompt = json.loads(path.read_text())
    prompt["classes"]["digit"] = "a number or a year written in digits"
    path.write_text(json.dumps(prompt))
    second, counts = run()
    assert counts.get("subject_forward", 0) == 0 and counts.get("llm_requests", 0) == 0
    assert counts["simulate"] > 0 and counts["score_units"] == 12
    assert set(s["key"] for s in second["scores"]).isdisjoint(s["key"] for s in first["scores"])


def test_human_revision_resimulates_only_that_unit(run):
    run()
    _, counts = run(revisions={"2:1": "numbers written in digits"})
    assert counts.get("subject_forward", 0) == 0 and counts.get("llm_requests", 0) == 0
    # Unit 2+: its one candidate on valid, then it and its token-lookup baseline on held-out records;
    # plus the one shuffled control that now carries the revised text. Nothing else.
    assert counts["simulate"] == 4
    assert counts["score_units"] == 2


def test_crashed_shard_resumes_where_it_stopped(run, fault_server):
    # 8 answers, then permanent errors for the next batch of 4 (in flight together), then healthy.
    server = fault_server(fail_with=[200] * 8 + [400] * 4, then_status=200)
    explainer = f"openai:canned@{server.base_url}"
    with pytest.raises(Exception, match="400"):
        run(explainer=explainer, k=1, shard_size=12)
    assert len(server.requests) == 12
    run(explainer=explainer, k=1, shard_size=12)
    assert len(server.requests) == 16, "only the 4 units the crash left unexplained are asked again"


def test_bad_input_fails_fast_without_retries(run):
    started = time.perf_counter()
    with pytest.raises(UserError, match="layer 7 is out of range"):
        run(layer=7)
    assert time.perf_counter() - started < 10, "a permanent error must not wait through retries"
    with pytest.raises(UserError, match="unit 99 is out of range"):
        run(units="0,99")
    with pytest.raises(UserError, match="shard_size must be at least 1"):
        run(shard_size=0)


def test_parameters_are_validated(run):
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError):
        run(layer="middle")
