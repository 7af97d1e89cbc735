"""The neuron viewer in a real browser (Debian's Chromium driven by Playwright).

Three sites: a real run of the pipeline on the tiny Llama; a hostile run whose corpus, tokens and
explanations carry HTML/JS payloads (nothing may execute, everything must show as text); and a
synthetic layer of 46,080 units, to check that the chunked data keeps the pages fast.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from playwright.sync_api import expect

from autoexplain import pipeline
from autoexplain.view import build_site
from autoexplain.view_data import js_data
# The fixtures are imported, not put in conftest, so that they stay module-scoped here.
from tests.viewer_fixtures import (INJECTED, PAYLOADS, Watched, browser, chromium, file_url, hostile_site,  # noqa: F401
                                   local_llm, real_site, rows_shown, serve, simulator, synthetic_layer)


# ---------------------------------------------------------------- tests without a browser


def test_data_scripts_cannot_break_out():
    nasty = {"t": "</script><script>alert(1)</script><!-- & \u2028\u2029 ]]>", "n": [1.5, None]}
    text = js_data("L1/u/0", nasty)
    assert "<" not in text and ">" not in text.split("=", 1)[1][:-2] and "&" not in text
    assert "\u2028" not in text and "\u2029" not in text
    body = re.match(r'^\(window\.__data=window\.__data\|\|\{\}\)\["L1/u/0"\]=(.*);\n$', text, re.S).group(1)
    assert json.loads(body) == nasty


def test_plots_stand_alone(tmp_path):
    from autoexplain.plots import plot_llm_vs_baselines, plot_mean_by_layer, plot_score_distribution

    scores = pl.read_parquet(synthetic_layer(tmp_path / "a", 3, 60) / "layer_3.parquet")
    more = pl.read_parquet(synthetic_layer(tmp_path / "b", 4, 60, seed=1) / "layer_4.parquet")
    both = pl.concat([scores, more])
    for fn, data in ((plot_score_distribution, scores), (plot_mean_by_layer, both), (plot_llm_vs_baselines, both.to_arrow())):
        path = fn(data, tmp_path / f"{fn.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    empty = plot_score_distribution(scores.head(0), tmp_path / "empty.png")
    assert empty.is_file()


def test_build_site_rejects_bad_inputs(tmp_path):
    from autoexplain.errors import UserError

    scores_dir = synthetic_layer(tmp_path / "out", 2, 5)
    with pytest.raises(UserError, match="not a finished scores folder"):
        build_site([tmp_path / "nowhere"], tmp_path / "site")
    with pytest.raises(UserError, match="layer 2 comes twice"):
        build_site([scores_dir, scores_dir], tmp_path / "site")
    (tmp_path / "mine" / "data").mkdir(parents=True)
    (tmp_path / "mine" / "data" / "notes.txt").write_text("not a site")
    with pytest.raises(UserError, match="holds a 'data' folder that no viewer build wrote"):
        build_site([scores_dir], tmp_path / "mine")
    assert (tmp_path / "mine" / "data" / "notes.txt").is_file()
    manifest = json.loads((scores_dir / "manifest.json").read_text())
    manifest["params"]["layer"] = 3
    (scores_dir / "manifest.json").write_text(json.dumps(manifest))
    shutil.copyfile(scores_dir / "layer_2.parquet", scores_dir / "layer_3.parquet")
    with pytest.raises(UserError, match=r"hold rows of layer\(s\) \[2\], but its manifest says layer 3"):
        build_site([scores_dir], tmp_path / "site")


# ---------------------------------------------------------------- browser tests


@pytest.mark.slow
@pytest.mark.parametrize("via", ["file", "http"])
def test_layer_to_unit_and_overlay(real_site, browser, serve, via, tmp_path):
    site, s, _ = real_site
    base = file_url(site) if via == "file" else serve(site)
    chosen = pl.read_parquet(s.directory / "chosen.parquet")
    llm = {(r["unit"], r["polarity"]): r["text"] for r in chosen.filter(pl.col("method") == "explainer").iter_rows(named=True)}

    w = Watched(browser, base)
    page = w.open("index.html")
    assert page.locator("#layers tbody tr").count() == 1
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=tmp_path / f"index_{via}.png", full_page=True)
    page.click("#layers a")
    page.wait_for_selector("body[data-ready='1']")
    assert page.url.endswith("layer.html#L1/mlp")
    assert rows_shown(page) == len(llm) == 4
    assert page.evaluate("document.getElementById('hist').naturalWidth") > 0
    page.screenshot(path=tmp_path / f"layer_{via}.png", full_page=True)

    page.click("#units tbody tr:first-child a")  # N0+
    page.wait_for_url(re.compile(r"unit\.html#L1/mlp/N0\+$"))
    page.wait_for_selector("body[data-ready='1']")
    assert page.text_content("#explanation") == llm[(0, 1)]
    assert page.locator("#candidates tbody tr").count() == 3
    assert page.locator("#scores tbody tr").count() == 5
    assert page.locator("#ex-top .exemplar").count() > 0 and page.locator("#ex-random .exemplar").count() > 0
    assert page.locator("#histogram svg rect").count() > 0
    assert page.locator("#top-tokens tbody tr").count() > 0
    assert page.locator("#outputs .tok.up").count() == 10 and page.locator("#outputs .tok.down").count() == 10
    sims = page.locator("#simulations")
    assert "side-by-side" in sims.get_attribute("class")
    n_windows = page.locator("#simulations .sim-row:not(.sim-head)").count()
    assert n_windows > 0 and page.locator("#simulations .otok").count() == 0
    page.screenshot(path=tmp_path / f"unit_{via}.png", full_page=True)

    page.click("#overlay-toggle")
    assert "overlay" in sims.get_attribute("class").split()
    assert page.locator("#simulations .sim-row").count() == n_windows
    assert page.locator("#simulations .otok .bar.sim").count() > 0
    page.screenshot(path=tmp_path / f"unit_overlay_{via}.png", full_page=True)
    page.click("#overlay-toggle")
    assert "side-by-side" in sims.get_attribute("class")

    page.click("#next-unit")  # hash navigation re-renders in place
    page.wait_for_selector("body[data-ready='1']")
    assert page.url.endswith("#L1/mlp/N0-") and page.text_content("#explanation") == llm[(0, -1)]
    w.close()


@pytest.mark.slow
def test_search_and_sort(real_site, browser, tmp_path):
    site, s, c = real_site
    scores = pl.read_parquet(c.path).filter((pl.col("method") == "explainer") & (pl.col("metric") == "top_and_random"))
    chosen = pl.read_parquet(s.directory / "chosen.parquet").filter(pl.col("method") == "explainer")
    w = Watched(browser, file_url(site))
    page = w.open("layer.html#L1")

    word = max(chosen["text"][0].split(), key=len).lower()
    n_match = sum(word in t.lower() for t in chosen["text"])
    page.fill("#search", word)
    expect(page.locator("#units tbody tr")).to_have_count(n_match)
    assert all(word in t.lower() for t in page.locator("#units tbody td.expl").all_text_contents())
    page.fill("#search", "zzz-no-such-explanation")
    expect(page.locator("#units tbody tr")).to_have_count(0)
    page.fill("#search", "")
    expect(page.locator("#units tbody tr")).to_have_count(4)

    page.click("#units th[data-key='score']")
    assert page.get_attribute("#units th[data-key='score']", "aria-sort") == "descending"
    shown = [float(x) if x != "–" else None for x in page.locator("#units tbody td:nth-child(3)").all_text_contents()]
    values = sorted((v for v in scores["value"].to_list() if v is not None and np.isfinite(v)), reverse=True)
    np.testing.assert_allclose([v for v in shown if v is not None], values, atol=1.5e-3)
    assert shown[len(values):] == [None] * (len(shown) - len(values)), "undefined scores sort last"
    page.click("#units th[data-key='score']")
    assert page.get_attribute("#units th[data-key='score']", "aria-sort") == "ascending"
    asc = [float(x) for x in page.locator("#units tbody td:nth-child(3)").all_text_contents() if x != "–"]
    assert asc == sorted(asc)
    page.select_option("#metric", "detection_auc")
    page.screenshot(path=tmp_path / "layer_sorted.png", full_page=True)
    w.close()


@pytest.mark.slow
def test_hostile_strings_stay_text(hostile_site, browser, serve, tmp_path):
    site = hostile_site
    for path in (site / "data").rglob("*.js"):
        text = path.read_text(encoding="utf-8")
        assert "<" not in text and "\u2028" not in text, f"{path} has a raw '<'"
    for base in (file_url(site), serve(site)):
        w = Watched(browser, base)
        page = w.open("index.html")
        assert page.locator("#layers tbody tr").count() == 2  # two layers, one source each
        assert page.locator("#plots img").count() == 3  # score by layer, distribution, llm vs baselines
        page.fill("#search", "onerror=window")
        expect(page.locator("#results tbody tr")).to_have_count(1)
        expect(page.locator("#count")).to_have_text("1 matching units")
        assert INJECTED in page.locator("#results td.expl").all_text_contents()
        w.check_clean()

        page = w.open("layer.html#L0")
        assert INJECTED in page.locator("#units td.expl").all_text_contents()
        w.check_clean()
        page = w.open("layer.html#L2")
        w.check_clean()

        page = w.open("unit.html#L0/N0+")
        assert page.text_content("#explanation") == INJECTED
        cands = page.locator("#candidates td.expl").all_text_contents()
        assert cands[0].startswith(INJECTED) and any(PAYLOADS[1] in c for c in cands)
        baselines = " ".join(page.locator("#baselines td.expl").all_text_contents())
        assert PAYLOADS[0] in baselines
        tokens = set(page.locator("#ex-top .tok, #ex-random .tok, #ex-quantile .tok").all_text_contents())
        assert any(p.replace("\u2028", "") in tokens or p in tokens for p in PAYLOADS[:5]), "payload tokens shown as text"
        page.click("#overlay-toggle")
        page.screenshot(path=tmp_path / "hostile_unit.png", full_page=True)
        w.check_clean()
        for unit in ("L0/mlp/N0-", "L0/mlp/N1+", "L2/N2-"):  # the last as older sites linked it
            w.open(f"unit.html#{unit}")
            w.page.click("#overlay-toggle")
            w.check_clean()
        # Hashes are parsed, never inserted: a hostile or malformed one shows a message.
        for bad in ("unit.html#<img src=x onerror=window.__pwned=1>", "unit.html#%E0%A4%A", "unit.html#L9/N0+",
                    "unit.html#L0/<b>/N1"):
            w.open(bad, ready=False)
            w.page.wait_for_selector("#explanation .error")
            w.check_clean()
        w.close()


@pytest.mark.slow
def test_46080_units_page_search_sort_and_open(browser, serve, tmp_path):
    """A layer of 46,080 units: chunk sizes, counts, search, sort, paging and the unit page. Times are
    printed, never asserted (a loaded machine is not a failure)."""
    n_neurons = 23_040  # x 2 polarities = 46,080 units, the neurons of SmolLM2-135M
    scores_dir = synthetic_layer(tmp_path / "out", 15, n_neurons)
    site = tmp_path / "site"
    started = time.perf_counter()
    build_site([scores_dir], site, meaning=False)
    built = time.perf_counter() - started

    chunks = sorted((site / "data" / "L15" / "mlp").glob("index_*.js"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(chunks) == 47
    sizes = [p.stat().st_size for p in chunks]
    assert max(sizes) < 400_000, f"index chunks too big: {max(sizes):,} bytes"
    first = chunks[0].read_text()
    assert len(json.loads(first.split("]=", 1)[1].rstrip(";\n"))["u"]) == 1000
    unit_files = list((site / "data" / "L15" / "mlp" / "u").glob("*.js"))
    assert len(unit_files) == 46_080 and max(p.stat().st_size for p in unit_files) < 40_000

    w = Watched(browser, serve(site))
    started = time.perf_counter()
    page = w.open("layer.html#L15/mlp")
    loaded = time.perf_counter() - started
    assert page.text_content("#count") == "46,080 units"
    assert rows_shown(page) == 100
    started = time.perf_counter()
    page.fill("#search", "Winter TEXT 12")
    expect(page.locator("#count")).to_contain_text("match")
    searched = time.perf_counter() - started
    texts = pl.read_parquet(tmp_path / "out" / "simulations" / "synthetic15" / "chosen.parquet").filter(
        pl.col("method") == "explainer")["text"]
    expected = sum(all(w in t.lower() for w in ("winter", "text", "12")) for t in texts)
    assert page.text_content("#count") == f"{expected:,} of 46,080 units match" and 0 < expected < 46_080
    page.fill("#search", "")
    expect(page.locator("#count")).to_have_text("46,080 units")
    started = time.perf_counter()
    page.click("#units th[data-key='score']")
    sorted_s = time.perf_counter() - started
    top = float(page.text_content("#units tbody tr:first-child td:nth-child(3)"))
    best = pl.read_parquet(scores_dir / "layer_15.parquet").filter(
        (pl.col("method") == "explainer") & (pl.col("metric") == "top_and_random"))["value"].max()
    assert top == pytest.approx(best, abs=1e-3)
    page.click("#next-page")
    assert "rows 101–200" in page.text_content("#pager")
    page.screenshot(path=tmp_path / "layer_46080.png")
    started = time.perf_counter()
    page.click("#units tbody tr:first-child a")
    page.wait_for_selector("body[data-ready='1']")
    unit_page = time.perf_counter() - started
    w.close()

    w = Watched(browser, file_url(site))
    started = time.perf_counter()
    w.open("layer.html#L15/mlp")
    loaded_file = time.perf_counter() - started
    w.close()
    print(f"\n46,080 units: built in {built:.1f}s, {sum(sizes) / 1e6:.1f} MB of index in {len(chunks)} chunks; "
          f"layer page {loaded:.2f}s over http, {loaded_file:.2f}s from file://; search {searched:.2f}s; "
          f"sort {sorted_s:.2f}s; unit page {unit_page:.2f}s")


def test_rebuild_reuses_exemplars_without_reading_records(real_site, tmp_path, monkeypatch):
    """A rebuild (after re-simulation, say) takes each unit's exemplar part from the cache under the
    output root: the records are not read again, the unit files come out byte for byte the same,
    and the site folder holds nothing but the site."""
    from autoexplain import view

    _, _, c = real_site
    reads = []
    original = view.records_reader

    def counting(src):
        reader = original(src)
        return None if reader is None else (lambda wanted: reads.append(len(wanted)) or reader(wanted))

    monkeypatch.setattr(view, "records_reader", counting)
    # The site of the fixture left its cache under the output root; this test starts with its own.
    assert list((c.directory.parent.parent / "memo" / "view").glob("L1-mlp-records-*.parquet")), "the exemplar cache"
    site, cache = tmp_path / "site", tmp_path / "cache"
    build_site([c.directory], site, cache_dir=cache)
    assert reads, "a cold build reads the records"
    first = {p.name: p.read_bytes() for p in (site / "data" / "L1" / "mlp" / "u").iterdir()}
    assert list(cache.glob("L1-mlp-records-*.parquet"))
    assert not [p for p in site.rglob(".*")], "hidden files in the site folder"

    reads.clear()
    build_site([c.directory], site, cache_dir=cache)
    assert reads == [], "the rebuild read the records again"
    assert {p.name: p.read_bytes() for p in (site / "data" / "L1" / "mlp" / "u").iterdir()} == first


def _unit_files(site: Path, layer: int) -> dict[str, dict]:
    """Each unit file's unit, by the unit's name in its source (0+, 5-)."""
    from autoexplain.view import unpacked

    out = {}
    for path in (site / "data" / f"L{layer}" / "mlp" / "u").iterdir():
        unit = unpacked(path.read_text())
        out[unit["name"].rsplit("/N", 1)[1]] = unit
    return out


def test_shards_of_one_layer_make_one_layer(real_site, local_llm, simulator, tiny_records, tmp_path):
    """A layer explained in shards of units is one layer to the viewer: the site built from the
    shards' scores holds each shard's units as that shard's own site shows them (links aside), with
    prev/next running across the shards. Overlapping shards are refused."""
    from autoexplain.embedding import EmbeddingSimulator
    from autoexplain.errors import UserError
    from autoexplain.layer import run_explain, run_score, run_simulate

    records_dir, out = tiny_records
    shards = []
    for units in ([0, 1], [5]):
        x = run_explain(records_dir, 1, out, units, cfg=pipeline.ExplainConfig(k=3, max_tokens=12), llm=local_llm)
        s = run_simulate(records_dir, x, out, sim=simulator.fresh())
        shards.append(run_score(records_dir, s, out, n_boot=200).directory)
    whole = _unit_files(build_site(shards, tmp_path / "both").parent, 1)
    assert sorted(whole) == ["0+", "0-", "1+", "1-", "5+", "5-"]
    links = ("prev", "next", "other", "similar")
    for shard in shards:
        alone = _unit_files(build_site([shard], tmp_path / shard.name).parent, 1)
        for name, unit in alone.items():
            assert {k: v for k, v in whole[name].items() if k not in links} == \
                   {k: v for k, v in unit.items() if k not in links}, name
            assert any(w["sim"] for w in unit["sims"].values()), "test-split simulations are on the page"
    assert whole["1-"]["next"] == "L1/mlp/N5+" and whole["5+"]["prev"] == "L1/mlp/N1-"
    summary = (tmp_path / "both" / "data" / "L1" / "mlp" / "summary.js").read_text()
    assert all(str(s) in summary for s in shards), "the layer's sources name every shard"

    _, _, c = real_site  # units 0 and 5 again
    with pytest.raises(UserError, match="overlap"):
        build_site([shards[0], c.directory], tmp_path / "overlap")
    other = EmbeddingSimulator(expand=3)  # another simulator: its scores do not belong to this run's layer
    x = run_explain(records_dir, 1, out, [5], cfg=pipeline.ExplainConfig(k=3, max_tokens=12), llm=local_llm)
    odd = run_score(records_dir, run_simulate(records_dir, x, out, sim=other), out, n_boot=200).directory
    with pytest.raises(UserError, match="layer 1 .* come from different recordings or simulators"):
        build_site([shards[0], odd], tmp_path / "mixed")


def test_simulations_reach_the_page_as_json(tmp_path):
    """The simulated activations are formatted to JSON text in polars: whole hundredths, NaN as null,
    a failed simulation as null with its reason, and the reason escaped for a <script>."""
    from autoexplain.view_data import sims_of
    from autoexplain.view_sources import LayerSource, sims_frame

    pl.DataFrame({"unit": [1, 1, 1, 2], "polarity": [1, 1, 1, -1], "method": ["explainer", "shuffled", "explainer", "explainer"],
                  "window_id": [5, 5, 6, 5], "split": ["test", "test", "test", "valid"],
                  "expected": [[0.123, float("nan"), 2.0], None, [1e-7, -0.0, 3.456], [1.0]],
                  "failure": [None, "bad </script>", None, None]},
                 schema_overrides={"expected": pl.List(pl.Float32)}).write_parquet(tmp_path / "layer_3.parquet")
    src = LayerSource(3, [tmp_path], [tmp_path], None, "")
    text = sims_of(sims_frame(src), [(1, 1), (2, -1)])
    assert list(text) == [(1, 1)], "only test-split windows are shown"
    assert "</script>" not in text[(1, 1)]
    assert json.loads(text[(1, 1)]) == {"5": {"sim": {"explainer": [12, None, 200], "shuffled": None},
                                              "fail": {"shuffled": "bad </script>"}},
                                        "6": {"sim": {"explainer": [0, 0, 346]}}}


# ---------------------------------------------------------------- sources, overview, search by meaning


def _as_source(scores_dir: Path, source: str) -> Path:
    """A synthetic layer's units as latents of another source: one polarity, and a `source` column
    in its scores and chosen explanations (as runs on an SAE write them)."""
    from tests.viewer_fixtures import reseal

    sims_dir = Path(json.loads((scores_dir / "manifest.json").read_text())["inputs"]["simulations"])
    for path in (*scores_dir.glob("layer_*.parquet"), sims_dir / "chosen.parquet"):
        pl.read_parquet(path).filter(pl.col("polarity") == 1).with_columns(source=pl.lit(source)).write_parquet(path)
    reseal(scores_dir)
    reseal(sims_dir)
    return scores_dir


def test_unit_names_come_from_the_source(tmp_path):
    """Pages and files are named by source: a neuron keeps its polarity mark, a latent has none."""
    from autoexplain.view import unpacked
    from autoexplain.view_data import unit_file, unit_page

    assert unit_page("L15/mlp", 1234, -1, True) == "L15/mlp/N1234-"
    assert unit_page("L15/sae-res-16k", 1234, 1, False) == "L15/sae-res-16k/N1234"
    assert unit_file("L15/mlp", 7, 1, True) == "data/L15/mlp/u/7p.js"
    assert unit_file("L15/sae-res-16k", 7, 1, False) == "data/L15/sae-res-16k/u/7.js"

    mlp = synthetic_layer(tmp_path / "a", 3, 6)
    sae = _as_source(synthetic_layer(tmp_path / "b", 3, 6, seed=1), "L3/sae-res-16k")
    site = tmp_path / "site"
    build_site([mlp, sae], site, meaning=False, plots=False)
    assert sorted(p.name for p in (site / "data" / "L3" / "sae-res-16k" / "u").iterdir()) == [f"{i}.js" for i in range(6)]
    assert len(list((site / "data" / "L3" / "mlp" / "u").iterdir())) == 12
    unit = unpacked((site / "data" / "L3" / "sae-res-16k" / "u" / "4.js").read_text())
    assert (unit["name"], unit["prev"], unit["next"], unit["other"]) == (
        "L3/sae-res-16k/N4", "L3/sae-res-16k/N3", "L3/sae-res-16k/N5", None)
    assert unpacked((site / "data" / "L3" / "mlp" / "u" / "4n.js").read_text())["other"] == "L3/mlp/N4+"


def test_explanations_are_embedded_without_their_frames():
    from autoexplain.view_meaning import search_text

    assert search_text('the word "who"') == '"who"'
    assert search_text("words related to gods and deity") == "gods and deity"
    assert search_text('"arguments" and "Noah" and other words related to arguments') == '"arguments" and "Noah" arguments'
    assert search_text("punctuation marks and symbols") == "punctuation marks and symbols"
    assert search_text("the words") == "the words"  # nothing would remain


def test_nearest_explanations_are_the_brute_force_ones():
    from autoexplain.view_meaning import nearest

    rng = np.random.default_rng(0)
    v = rng.normal(size=(700, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[5] = 0  # a unit without an explanation: nobody's neighbour
    idx, sim = nearest(v, 4, block=128)
    c = v @ v.T
    np.fill_diagonal(c, -np.inf)
    c[:, 5] = -np.inf
    for i in (0, 1, 300, 699):
        assert idx[i].tolist() == np.argsort(-c[i], kind="stable")[:4].tolist()
        np.testing.assert_allclose(sim[i], np.sort(c[i])[::-1][:4], rtol=1e-5)
    # Shortlisted in a projection, ranked by the full cosine: on vectors that live in 6 dimensions
    # of the 16, the 6 axes lose nothing, and the answer is the exact one.
    basis = np.linalg.qr(rng.normal(size=(16, 6)))[0]
    low = rng.normal(size=(700, 6)) @ basis.T
    low = (low / np.linalg.norm(low, axis=1, keepdims=True)).astype(np.float32)
    exact, _ = nearest(low, 4, block=128)
    shortlisted, values = nearest(low, 4, block=100, axes=basis, shortlist=10)
    assert (shortlisted == exact).mean() > 0.99
    np.testing.assert_allclose(values[:, 0], (low * low[shortlisted[:, 0]]).sum(axis=1), rtol=1e-5)


@pytest.mark.slow
def test_overview_search_by_meaning_and_similar_units(browser, serve, tmp_path):
    """Two layers and two sources: the overview's layers x sources grid with score histograms, the
    best units of each, a search by meaning for a word no explanation contains, and the similar
    units of a unit page, which lead to those units."""
    mlp3 = synthetic_layer(tmp_path / "a", 3, 30)
    mlp4 = synthetic_layer(tmp_path / "b", 4, 30, seed=2)
    sae = _as_source(synthetic_layer(tmp_path / "c", 3, 30, seed=1), "L3/sae-res-16k")
    site = tmp_path / "site"
    build_site([mlp3, mlp4, sae], site)
    assert not [p for p in site.rglob(".*")], "hidden files in the site folder"

    w = Watched(browser, serve(site))
    page = w.open("index.html")
    assert page.locator("#layers thead th").all_text_contents() == ["Layer", "mlp", "sae-res-16k"]
    assert page.locator("#layers tbody tr").count() == 2
    assert page.locator("#layers td.cell").count() == 3 and page.locator("#layers td.muted").count() == 1  # no SAE on layer 4
    assert page.locator("#layers td[data-source='L3/sae-res-16k'] svg.mini-hist rect").count() == 20
    assert page.locator("#best .best-of").count() == 3
    first_best = page.locator(".best-of[data-source='L3/sae-res-16k'] a.unit-link").first
    assert re.fullmatch(r"N\d+", first_best.text_content())
    page.screenshot(path=tmp_path / "overview.png", full_page=True)

    page.fill("#search", "winter")
    expect(page.locator("#count")).to_contain_text("matching units")
    n_text = page.locator("#results tbody tr").count()
    assert n_text > 0 and all("winter" in t for t in page.locator("#results td.expl").all_text_contents())
    page.select_option("#search-mode", "meaning")
    page.fill("#search", "snow")  # in no explanation: found by meaning only
    expect(page.locator("#count")).to_contain_text("nearest in meaning")
    top = page.locator("#results td.expl").all_text_contents()[:5]
    assert sum("winter" in t for t in top) >= 4, top
    page.screenshot(path=tmp_path / "search_by_meaning.png", full_page=True)

    page.locator("#results a.unit-link").first.click()
    page.wait_for_selector("body[data-ready='1']")
    similar = page.locator("#similar li a.unit-link")
    assert similar.count() == 8
    shown = page.text_content("#explanation")
    words = set(shown.split()[:3])
    assert any(words & set(t.split()) for t in page.locator("#similar .expl").all_text_contents())
    page.screenshot(path=tmp_path / "unit_similar.png", full_page=True)
    target = similar.first.get_attribute("href")
    similar.first.click()
    page.wait_for_selector("body[data-ready='1']")
    assert page.url.endswith(target)
    w.close()

    w = Watched(browser, file_url(site))
    page = w.open("unit.html#L3/sae-res-16k/N7")
    assert page.text_content("#title") == "Layer 3 · sae-res-16k · N7"
    assert page.locator("#other-polarity").count() == 0
    page.click("#next-unit")
    page.wait_for_selector("body[data-ready='1']")
    assert page.url.endswith("#L3/sae-res-16k/N8")
    page = w.open("layer.html#L3/sae-res-16k")
    assert page.text_content("#count") == "30 units"
    w.close()
