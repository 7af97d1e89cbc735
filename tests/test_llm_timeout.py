"""The request timeout is the user's: `--timeout SECONDS` on every command that calls an LLM, flow and
deployment parameter `timeout`, checked before any work and carried (like --retries) to every server
LLM the run makes. A slow server (llama.cpp reading a 2,000-token prompt on a CPU) otherwise never
answers in the fixed 120 s, and the line that says so names the option."""

from __future__ import annotations

import inspect

import pytest
import yaml

from autoexplain import preflight
from autoexplain.errors import UserError
from autoexplain.llm import LLMError, make_llm, set_limits
from tests.llama_server import fault_server  # noqa: F401  (fixture)


def test_every_llm_command_checks_its_timeout_first(tmp_path):
    from tests.test_cli import _one_error_line, run

    for args in (["explain", "--records", str(tmp_path)], ["simulate", "--records", str(tmp_path), "--explanations",
                 str(tmp_path)], ["explain-layer", "--out", str(tmp_path)], ["explain-model", "--out", str(tmp_path)],
                 ["rescore", "--out", str(tmp_path)], ["revise", "--out", str(tmp_path), "--unit", "1", "--text", "t"]):
        line = _one_error_line(run(*args, "--timeout", "0"))
        assert "--timeout: must be more than 0 seconds, got 0" in line and "pass --timeout SECONDS > 0" in line, (args, line)


def test_a_flow_parameter_timeout_is_checked_too():
    with pytest.raises(UserError, match="parameter timeout: must be more than 0 seconds, got -1"):
        preflight.check_limits(None, None, preflight.flow_name, None, None, -1)
    preflight.check_limits(None, None, preflight.flow_name, None, None, 600)


def test_every_flow_and_deployment_takes_it():
    from pathlib import Path

    from flows.explain_layer import explain_layer, rescore, revise
    from flows.explain_model import explain_model

    for flow in (explain_layer, rescore, revise, explain_model):
        assert "timeout" in inspect.signature(flow.fn).parameters, flow.name
    shipped = yaml.safe_load((Path(__file__).parents[1] / "deployments" / "prefect.yaml").read_text())["deployments"]
    assert all(d["parameters"].get("timeout", "missing") is None for d in shipped), "every deployment shows it"


def test_the_runs_timeout_reaches_its_server_llms_and_their_line_names_it(fault_server, monkeypatch):  # noqa: F811
    """A server that never answers in time: each attempt waits the run's timeout, not 120 s, and the
    line at the end says how to raise it."""
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    srv = fault_server(hold=True)
    try:
        set_limits(retries=0, timeout=0.5)
        llm = make_llm(f"openai:m@{srv.base_url}")
        assert llm.timeout == 0.5
        with pytest.raises(LLMError) as caught:
            llm.complete(["p"], max_tokens=1)
    finally:
        set_limits()
        srv.release(10)
    line = str(caught.value)
    assert f"requests to {srv.base_url} timed out 1 times (after 0.5 s each)" in line
    assert "raise --timeout SECONDS (flow parameter timeout)" in line and "\n" not in line
    assert len(srv.requests) == 1
    assert make_llm(f"openai:m@{srv.base_url}").timeout == 120.0, "set_limits() gives the default back"


def test_a_later_run_in_the_same_process_gets_its_own_limits(fault_server):  # noqa: F811
    """The tasks keep one LLM per spec and process (a server's concurrency is shared by the shards),
    made with the limits of when it was made: a later run in the same process (a notebook, a dask
    worker) with other limits gets an LLM with those. Limits alone: the same limits reuse it."""
    from autoexplain.tasks.classify import scorer_for
    from autoexplain.tasks.stages import llm_for, simulator_for

    srv = fault_server()
    spec = f"openai:m@{srv.base_url}"
    try:
        set_limits(concurrency=2, timeout=5)
        first, sim, scorer = llm_for(spec), simulator_for(f"all-at-once:{spec}|x"), scorer_for(f"detection:{spec}")
        assert llm_for(spec) is first and (first.llm.max_concurrency, first.llm.timeout) == (2, 5)
        assert (sim.llm.timeout, scorer.llm.timeout) == (5, 5)
        set_limits(concurrency=3, timeout=7)
        again = llm_for(spec)
        assert again is not first and (again.llm.max_concurrency, again.llm.timeout) == (3, 7)
        assert simulator_for(f"all-at-once:{spec}|x").llm.timeout == scorer_for(f"detection:{spec}").llm.timeout == 7
    finally:
        set_limits()
