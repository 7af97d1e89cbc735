"""Money (issue 13, item 5): the price table is data that can be overridden, a request is priced by
its prompt, cached and completion tokens, and every unit's cost reaches the scores table and the
run's cost line: explanation, best-of-k's selection and scored simulations, with unknown prices kept
unknown. The LLM is a real loopback server (bench/llm_server.py) that answers for any model name."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from autoexplain import pipeline, prices
from autoexplain.errors import UserError
from autoexplain.llm import OpenAILLM
from autoexplain.simulate import AllAtOnceSimulator
from autoexplain.summary import cost_line, run_cost
from tests.viewer_fixtures import Watched, browser, chromium, file_url  # noqa: F401  (fixtures)


def test_lookup_by_name_then_longest_prefix(monkeypatch):
    monkeypatch.delenv(prices.OVERRIDE_ENV, raising=False)
    assert prices.price_of("gpt-4o-mini") == prices.Price(0.15, 0.075, 0.60)
    assert prices.price_of("gpt-4o-mini-2024-07-18") == prices.price_of("gpt-4o-mini"), "a snapshot, not gpt-4o"
    assert prices.price_of("gpt-4o-2024-08-06") == prices.price_of("gpt-4o")
    assert prices.price_of("meta-llama/Llama-3.1-8B") is None
    assert prices.price_of("gpt-4omni") is None, "a prefix must end at a dash"


def test_a_request_is_priced_by_its_tokens(monkeypatch):
    monkeypatch.delenv(prices.OVERRIDE_ENV, raising=False)
    # 1,000 prompt tokens of which 600 cached, 200 completion tokens, at 0.15 / 0.075 / 0.60 per 1M.
    assert prices.dollars("gpt-4o-mini", 1000, 600, 200) == pytest.approx((400 * 0.15 + 600 * 0.075 + 200 * 0.60) / 1e6)
    # No cached price: cached tokens cost as input.
    assert prices.dollars("davinci-002", 1000, 600, 0) == pytest.approx(1000 * 2.0 / 1e6)
    assert prices.dollars("unknown-model", 10, 0, 10) is None
    assert prices.add(0.5, None, 1.0) is None and prices.add(0.5, 0.25) == 0.75


def test_an_override_file_adds_and_replaces(tmp_path, monkeypatch):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"my-vllm-model": {"input": 0.05, "output": 0.1},
                                           "gpt-4o-mini": {"input": 1.0, "cached_input": 0.5, "output": 2.0}}}))
    monkeypatch.setenv(prices.OVERRIDE_ENV, str(path))
    assert prices.price_of("my-vllm-model") == prices.Price(0.05, None, 0.1)
    assert prices.price_of("gpt-4o-mini").input == 1.0
    assert prices.price_of("gpt-4o").input == 2.5, "the rest of the built-in table stays"
    line = cost_line({"units": 2, "unknown": 0, "dollars": 0.5, "per_unit": 0.25})
    assert line.endswith(f"at the prices of autoexplain/prices.json and {path}"), "the cost line names the file it used"
    path.write_text('{"models": {"x": {"output": 1}}}')
    monkeypatch.setenv(prices.OVERRIDE_ENV, str(path) + ".missing")
    with pytest.raises(UserError, match="cannot read the price table"):
        prices.table()


@pytest.fixture(scope="module")
def units(tiny_records):
    from autoexplain.layer import load_units

    records_dir, _ = tiny_records
    return load_units(records_dir, 1, [0, 1])


def run_stages(units, url: str, model: str):
    llm = OpenAILLM(model, url, api_key="test", max_retries=1)
    x = pipeline.explain_stage(units, llm, pipeline.ExplainConfig(k=3))
    chosen, sims = pipeline.simulate_stage(units, x, AllAtOnceSimulator(llm))
    scores = pipeline.score_stage(units, sims, chosen, n_boot=50)
    return x, chosen, sims, scores


def test_every_unit_cost_reaches_the_scores_table(bench_server, units, monkeypatch):
    monkeypatch.delenv(prices.OVERRIDE_ENV, raising=False)
    # No cached prompt tokens here, so that each row's cost is its tokens at the full prices (the
    # cached-input price is checked in tests/test_budget.py).
    monkeypatch.setattr(bench_server.prefix_cache, "block", 0)
    x, chosen, sims, scores = run_stages(units, bench_server.base_url, "gpt-4o-mini")
    p = prices.price_of("gpt-4o-mini")
    for row in x.to_pylist():
        want = (row["prompt_tokens"] * p.input + row["completion_tokens"] * p.output) / 1e6
        assert row["dollars"] == pytest.approx(want)
        assert row["method"] != pipeline.EXPLAINER or row["dollars"] > 0
    explainer_rows = {(r["unit"], r["polarity"]): r for r in chosen.to_pylist() if r["method"] == pipeline.EXPLAINER}
    assert all(r["selection_tokens"] > 0 and r["selection_dollars"] > 0 for r in explainer_rows.values()), \
        "best-of-k's simulations on valid are paid for too"
    sim_rows = sims.to_pylist()
    # A record's share of its request: its tokens at the input price, or the output price where
    # they were completion tokens.
    assert all(r["tokens"] * p.input / 1e6 * 0.999 <= r["dollars"] <= r["tokens"] * p.output / 1e6 * 1.001 for r in sim_rows)
    s = pl.from_arrow(scores)
    for (unit, pol), row in explainer_rows.items():
        mine = s.filter((pl.col("unit") == unit) & (pl.col("polarity") == pol) & (pl.col("method") == pipeline.EXPLAINER))
        sim_total = sum(r["dollars"] for r in sim_rows if (r["unit"], r["polarity"], r["method"]) == (unit, pol, pipeline.EXPLAINER))
        want = row["dollars"] + row["selection_dollars"] + sim_total
        assert mine.height > 1 and mine["dollars"].to_list() == pytest.approx([want] * mine.height)
    cost = run_cost(s)
    assert cost["units"] == 4 and cost["unknown"] == 0 and cost["dollars"] > 0
    assert cost_line(cost).startswith(f"cost of these scores: ${cost['dollars']:.4f} for 4 units")


def test_a_model_without_a_price_stays_unknown(bench_server, units, monkeypatch):
    monkeypatch.delenv(prices.OVERRIDE_ENV, raising=False)
    _, _, sims, scores = run_stages(units, bench_server.base_url, "my-own-model")
    assert all(r["dollars"] is None for r in sims.to_pylist())
    cost = run_cost(pl.from_arrow(scores))
    assert cost["dollars"] is None and cost["unknown"] == 4
    assert "4 units used a model with no known price" in cost_line(cost)


def test_offline_components_cost_nothing(tiny_records):
    from autoexplain.embedding import EmbeddingSimulator
    from autoexplain.explain_embedding import EmbeddingExplainer
    from autoexplain.layer import load_units

    records_dir, _ = tiny_records
    us = load_units(records_dir, 1, [0])
    x = pipeline.explain_stage(us, EmbeddingExplainer(), pipeline.ExplainConfig(k=2))
    chosen, sims = pipeline.simulate_stage(us, x, EmbeddingSimulator())
    scores = pl.from_arrow(pipeline.score_stage(us, sims, chosen, n_boot=50))
    assert set(scores["dollars"].to_list()) == {0.0}
    assert run_cost(scores)["dollars"] == 0.0


@pytest.mark.slow
def test_costs_reach_the_viewer(bench_server, tiny_records, browser, tmp_path, monkeypatch):  # noqa: F811
    """The layer overview shows the run's cost line's total and per-unit figure, and each unit page
    the unit's own cost, as `summary.unit_costs` computes it from the scores table."""
    from autoexplain.layer import run_explain, run_score, run_simulate
    from autoexplain.summary import unit_costs
    from autoexplain.view import build_site

    monkeypatch.delenv(prices.OVERRIDE_ENV, raising=False)
    records_dir, _ = tiny_records
    out = tmp_path / "out"
    llm = OpenAILLM("gpt-4o-mini", bench_server.base_url, api_key="test", max_retries=1)
    x = run_explain(records_dir, 1, out, [0, 1], cfg=pipeline.ExplainConfig(k=2), llm=llm)
    c = run_score(records_dir, run_simulate(records_dir, x, out, sim=AllAtOnceSimulator(llm)), out, n_boot=20)
    scores = pl.read_parquet(c.path)
    cost, per_unit = run_cost(scores), {(u, p): d for _, u, p, d in unit_costs(scores).iter_rows()}
    assert cost["dollars"] > 0 and all(d > 0 for d in per_unit.values())
    site = build_site([c.directory], tmp_path / "site")

    def dollars(text: str) -> list[float]:
        return [float(v) for v in re.findall(r"\$([0-9.]+)", text)]

    w = Watched(browser, file_url(site.parent))
    page = w.open("index.html")
    shown = page.text_content("#layers tbody .cost")
    assert dollars(shown) == pytest.approx([cost["dollars"], cost["per_unit"]], rel=1e-3) and "per unit" in shown, shown
    page = w.open("layer.html#L1/mlp")
    assert dollars(page.text_content("#layer-cost"))[0] == pytest.approx(cost["dollars"], rel=1e-3)
    page = w.open("unit.html#L1/mlp/N1-")
    headline = page.text_content("#headline")
    assert " · cost $" in headline and dollars(headline.split(" · cost ")[1]) == pytest.approx([per_unit[(1, -1)]], rel=1e-3)
    w.close()
