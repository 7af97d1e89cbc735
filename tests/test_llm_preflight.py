"""Bad LLM input, caught before any work with one line (issue 13, item 8): a refused key, a model the
server does not serve, a server without echo logprobs for the all-at-once simulator, and limits of
0 or below. Real loopback servers (tests/llama_server.py's FaultServer with a server's traits); no
stage request reaches them (`requests` stays empty; the preflight's own probes count apart).

Budgets of 0, negative, without a unit, or in dollars for an unpriced model: tests/test_budget.py."""

from __future__ import annotations

import pytest

from autoexplain import preflight
from autoexplain.errors import UserError
from tests.llama_server import fault_server, llama_server  # noqa: F401  (fixtures)
from tests.test_cli import _one_error_line
from tests.test_cli_runs import cli, home  # noqa: F401  (fixture)

# (server traits, simulator kind or None for the explainer, key in $OPENAI_API_KEY, what the line says)
CASES = {
    "wrong key": (dict(api_key="right"), None, "wrong", "refused the API key (HTTP 401)"),
    "no key": (dict(api_key="right"), "all-at-once", None, "refused the API key (HTTP 401)"),
    "model not served": (dict(models=["llama-3-8b"]), None, "right", "serves no model 'm' (it serves llama-3-8b)"),
    "model not served, simulator": (dict(models=["a", "b"]), "chat-json", "right", "serves no model 'm' (it serves a, b)"),
    "no echo logprobs": (dict(echo=False), "all-at-once", "right", "returns no prompt logprobs for 'm'"),
}


def _spec(server, kind):
    llm = f"openai:m@{server.base_url}"
    return ("simulator", f"{kind}:{llm}") if kind else ("explainer", llm)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_server_is_one_line(fault_server, monkeypatch, case):
    traits, kind, key, needle = CASES[case]
    server = fault_server(**traits)
    if key is None:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    else:
        monkeypatch.setenv("OPENAI_API_KEY", key)
    name, spec = _spec(server, kind)
    check = preflight.check_simulator if kind else preflight.check_explainer
    with pytest.raises(UserError) as caught:
        check(spec, preflight.cli_flag)
    line = str(caught.value)
    assert line.startswith(f"--{name}: the LLM server at {server.base_url} ") and needle in line, line
    assert "\n" not in line and " — " in line, "one line with its fix"
    assert server.requests == [] and server.probes >= 1


def test_good_server_passes_with_its_probes_only(fault_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "right")
    server = fault_server(api_key="right", models=["m"])
    preflight.check_simulator(f"all-at-once:openai:m@{server.base_url}", preflight.cli_flag)
    preflight.check_explainer(f"openai:m@{server.base_url}", preflight.cli_flag)
    assert server.requests == [] and server.probes == 3, "GET /models twice, one echo request"


@pytest.mark.slow
def test_echo_probe_against_llama_cpp(llama_server):
    """llama.cpp's server returns prompt logprobs: the probe says yes. Without the API's /v1 root in
    the URL it lists no models (404): said at once, for an explainer too, which sends no echo probe."""
    preflight.check_simulator(f"all-at-once:openai:{llama_server.model}@{llama_server.base_url}")
    root = llama_server.base_url.removesuffix("/v1")
    with pytest.raises(UserError) as caught:
        preflight.check_explainer(f"openai:{llama_server.model}@{root}", preflight.cli_flag)
    assert str(caught.value).startswith(f"--explainer: no OpenAI-compatible API at {root} (GET {root}/models: HTTP 404)")
    assert f"did you mean {root}/v1?" in str(caught.value)


def test_limits_of_zero_or_below():
    for args, needle in (((0, None), "--concurrency: must be at least 1, got 0"),
                         ((-4, None), "--concurrency: must be at least 1, got -4"),
                         ((None, 0.0), "--rpm: must be more than 0 requests per minute"),
                         ((None, -1.0), "--rpm: must be more than 0 requests per minute"),
                         ((None, None, 0.0), "--tpm: must be more than 0 tokens per minute"),
                         ((None, None, -10.0), "--tpm: must be more than 0 tokens per minute"),
                         ((None, None, None, -1), "--retries: must be at least 0, got -1")):
        concurrency, rpm, *tpm_retries = args
        with pytest.raises(UserError, match=needle):
            preflight.check_limits(concurrency, rpm, preflight.cli_flag, *tpm_retries)
    preflight.check_limits(None, None, preflight.cli_flag, None, 0)  # no retries: a request is sent once


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong key", "model not served", "no echo logprobs"])
def test_explain_layer_command_stops_before_any_work(home, fault_server, tiny_llama_dir, prose_corpus, tmp_path,
                                                     monkeypatch, case):
    traits, kind, key, needle = CASES[case]
    server = fault_server(**traits)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    name, spec = _spec(server, kind)
    out = tmp_path / "out"
    line = _one_error_line(cli(home, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus),
                               "--layer", "1", "--out", str(out), f"--{name}", spec))
    assert f"--{name}: the LLM server at {server.base_url} " in line and needle in line, line
    assert server.requests == [] and not out.exists(), "nothing sent, nothing written"


@pytest.mark.slow
def test_flow_fails_with_the_line(prefect_results, fault_server, tiny_llama_dir, prose_corpus, tmp_path, monkeypatch):
    from autoexplain.flows.explain_layer import explain_layer

    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    server = fault_server(api_key="right")
    for params, needle in ((dict(explainer=f"openai:m@{server.base_url}"), "parameter explainer: the LLM server at "),
                           (dict(tpm=0.0), "parameter tpm: must be more than 0 tokens per minute"),
                           (dict(retries=-2), "parameter retries: must be at least 0, got -2")):
        state = explain_layer(layer=1, model=tiny_llama_dir, corpus=str(prose_corpus), out=str(tmp_path / "o"),
                              return_state=True, **params)
        assert state.is_failed() and state.message.startswith(needle) and "\n" not in state.message, state.message
    assert server.requests == [] and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_broken_price_table_stops_before_any_work(home, fault_server, tiny_llama_dir, prose_corpus, tmp_path,
                                                    monkeypatch):
    """A server LLM is priced from the table (and $AUTOEXPLAIN_PRICES): an unreadable override is one
    line before recording, not a failure in the explain stage."""
    from autoexplain.prices import OVERRIDE_ENV

    server = fault_server()
    bad = tmp_path / "prices.json"
    bad.write_text('{"models": {"m": {"output": 1.0}}}')  # no input price
    monkeypatch.setenv(OVERRIDE_ENV, str(bad))
    out = tmp_path / "out"
    line = _one_error_line(cli(home, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus),
                               "--layer", "1", "--out", str(out), "--explainer", f"openai:m@{server.base_url}"))
    assert f"cannot read the price table {bad}" in line, line
    assert server.requests == [] and not out.exists(), "nothing sent, nothing written"


def test_each_server_llm_takes_its_key_from_the_variable_its_spec_names(fault_server, monkeypatch):
    """An explainer at OpenAI and a simulator on another provider need two keys: '#VAR' after a
    spec names where its key is. The server that wants "theirs" gets it from $THEIR_KEY, not
    $OPENAI_API_KEY (which is not sent there); a variable named and not set, or a refused key, is one
    line before any work that says which variable to set."""
    from autoexplain.llm import make_llm

    monkeypatch.setenv("OPENAI_API_KEY", "mine")
    monkeypatch.setenv("THEIR_KEY", "theirs")
    server = fault_server(api_key="theirs", models=["m"])
    spec = f"openai:m@{server.base_url}#THEIR_KEY"
    preflight.check_explainer(spec, preflight.cli_flag)
    preflight.check_simulator(f"all-at-once:{spec}", preflight.cli_flag)
    assert make_llm(spec, max_retries=0).complete(["p"], max_tokens=1)[0], "answered: the key was $THEIR_KEY's"
    assert len(server.requests) == 1

    with pytest.raises(UserError) as refused:  # the default variable's key is refused, and the line says how to name another
        preflight.check_explainer(f"openai:m@{server.base_url}", preflight.cli_flag)
    assert "refused the API key (HTTP 401)" in str(refused.value)
    assert "set a valid key in $OPENAI_API_KEY, or name the variable that holds this server's key after '#'" in str(refused.value)
    monkeypatch.delenv("THEIR_KEY")
    with pytest.raises(UserError) as unset:
        preflight.check_simulator(f"all-at-once:{spec}", preflight.cli_flag)
    assert str(unset.value) == (f"--simulator: $THEIR_KEY is not set, and '{spec}' names it as the key of "
                                f"{server.base_url} — export THEIR_KEY=... (that server's API key)")
    with pytest.raises(UserError, match="'#1KEY' is no environment variable's name"):
        preflight.check_explainer(f"openai:m@{server.base_url}#1KEY", preflight.cli_flag)
    assert len(server.requests) == 1, "no stage request after the first"
