"""The viewer's sources, overview and search by meaning: units named by their source, explanations
embedded without their frames, nearest explanations against brute force, and in Chromium the
overview's layers x sources grid, search by text and by meaning, and similar units."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from playwright.sync_api import expect

from autoexplain.layout import input_of
from autoexplain.view import build_site
# The fixtures are imported, not put in conftest, so that they stay module-scoped here.
from tests.viewer_fixtures import Watched, browser, chromium, file_url, serve, synthetic_layer  # noqa: F401


def _as_source(scores_dir: Path, source: str) -> Path:
    """A synthetic layer's units as latents of another source: one polarity, and a `source` column
    in its scores and chosen explanations (as runs on an SAE write them)."""
    from tests.viewer_fixtures import reseal

    sims_dir = input_of(scores_dir, json.loads((scores_dir / "manifest.json").read_text())["inputs"]["simulations"])
    for path in (*scores_dir.glob("layer_*.parquet"), sims_dir / "chosen.parquet"):
        pl.read_parquet(path).filter(pl.col("polarity") == 1).with_columns(source=pl.lit(source)).write_parquet(path)
    reseal(scores_dir)
    reseal(sims_dir)
    return scores_dir


def test_unit_names_come_from_the_source(tmp_path):
    """Pages and files are named by source: a neuron keeps its polarity mark, a latent has none."""
    from autoexplain.view_pack import unpacked
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
    from autoexplain.neighbours import nearest

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


def test_units_that_share_an_explanation_are_listed_in_unit_order():
    """Equal cosines (units with the same explanation) are listed in row order, in both the exact
    and the shortlisted search, and a change elsewhere does not reshuffle them: a rebuild then
    rewrites only the unit files that really changed."""
    from autoexplain.neighbours import nearest

    rng = np.random.default_rng(1)
    v = rng.normal(size=(400, 16)).astype(np.float32)
    v[100:160] = v[7]  # sixty more units share unit 7's explanation
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    axes = np.linalg.qr(rng.normal(size=(16, 8)))[0]
    copies = [7, *range(100, 160)]
    for kw in ({}, {"axes": axes, "shortlist": 20}):
        idx, sim = nearest(v, 8, block=64, **kw)
        assert idx[7].tolist() == copies[1:9] and idx[130].tolist() == [7, *range(100, 107)], kw
        np.testing.assert_allclose(sim[7], 1.0, rtol=1e-5)
        moved = v.copy()
        moved[300] = -moved[300]  # another unit's explanation changes
        again, _ = nearest(moved, 8, block=64, **kw)
        assert (again[copies] == idx[copies]).all(), kw


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
    page.wait_for_selector("body[data-ready='1'][data-unit='L3/sae-res-16k/N8']")
    assert page.url.endswith("#L3/sae-res-16k/N8")
    page = w.open("layer.html#L3/sae-res-16k")
    assert page.text_content("#count") == "30 units"
    w.close()


def test_neurons_and_latents_of_a_layer_are_units_apart_in_the_plots(tmp_path):
    from autoexplain.plots import per_unit

    neurons = pl.read_parquet(synthetic_layer(tmp_path / "a", 3, 20) / "layer_3.parquet")
    latents = neurons.with_columns(pl.lit("sae-res-40").alias("source"))
    both = pl.concat([neurons, latents], how="diagonal_relaxed")
    n = neurons.select("unit", "polarity").unique().height
    assert per_unit(both).height == 2 * n, "latent 5 of layer 3 is not neuron 5 of layer 3"
    assert per_unit(neurons).height == n


def test_no_site_inside_a_finished_stage_folder(tmp_path):
    """A sealed stage folder, or a folder inside one, would get files its manifest does not list."""
    from autoexplain.errors import UserError

    scores_dir = synthetic_layer(tmp_path / "out", 2, 5)
    before = sorted(p.name for p in scores_dir.iterdir())
    with pytest.raises(UserError, match=f"{scores_dir} is a finished scores folder; a site there would mix"):
        build_site([scores_dir], scores_dir)
    with pytest.raises(UserError, match=f"is inside the finished scores folder {scores_dir};"):
        build_site([scores_dir], scores_dir / "site")
    assert sorted(p.name for p in scores_dir.iterdir()) == before
    assert build_site([scores_dir], tmp_path / "out" / "site").is_file()  # beside it is fine


def test_a_unit_that_fails_to_load_leaves_nothing_of_the_unit_before(browser, tmp_path):  # noqa: F811
    """A hash changed to a unit the site lacks showed its error under the previous unit's score,
    candidates and tables; a fresh load of that hash shows empty sections, and so must the change."""
    site = tmp_path / "site"
    build_site([synthetic_layer(tmp_path / "a", 3, 6)], site, meaning=False, plots=False)
    w = Watched(browser, file_url(site))
    page = w.open("unit.html#L3/mlp/N0+")
    assert page.text_content("#explanation") and page.text_content("#headline") != ""
    assert page.locator("#candidates tbody tr").count() > 0 and page.locator("#scores tbody tr").count() > 0
    page.evaluate("location.hash = '#L3/mlp/N10+'")
    page.wait_for_selector("body[data-unit='L3/mlp/N10+'] #explanation .error")
    assert "N10+" in page.text_content("#title")
    for section in ("unit-nav", "headline", "candidates", "baselines", "scores", "similar", "histogram", "stats",
                    "outputs", "top-tokens", "simulations", "ex-top", "ex-quantile", "ex-random"):
        assert page.evaluate(f"document.getElementById('{section}').childNodes.length") == 0, section
    w.errors.clear()  # the missing unit's data script is a console error of its own
    w.close()
