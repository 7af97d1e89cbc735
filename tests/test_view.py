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
    (tmp_path / "blog").mkdir()
    (tmp_path / "blog" / "index.html").write_text("my page")
    with pytest.raises(UserError, match="holds index.html, which no viewer build wrote"):
        build_site([scores_dir], tmp_path / "blog")
    assert (tmp_path / "blog" / "index.html").read_text() == "my page"
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

    page.click("#next-unit")  # hash navigation re-renders in place; the hashchange handler runs after the click returns
    page.wait_for_selector("body[data-ready='1'][data-unit='L1/mlp/N0-']")
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


def _two_shards(tiny_records, local_llm, simulator) -> list[Path]:
    """The scores folders of layer 1's units 0-1 and of its unit 5, run as two shards."""
    from autoexplain.layer import run_explain, run_score, run_simulate

    records_dir, out = tiny_records
    shards = []
    for units in ([0, 1], [5]):
        x = run_explain(records_dir, 1, out, units, cfg=pipeline.ExplainConfig(k=3, max_tokens=12), llm=local_llm)
        s = run_simulate(records_dir, x, out, sim=simulator.fresh())
        shards.append(run_score(records_dir, s, out, n_boot=200).directory)
    return shards


def _data_files(site: Path) -> dict[str, bytes]:
    """Every file under the site's data folder but site.js (which says when it was built)."""
    return {p.relative_to(site).as_posix(): p.read_bytes() for p in sorted((site / "data").rglob("*"))
            if p.is_file() and p.name != "site.js"}


def test_a_rebuild_writes_only_the_unit_files_that_changed(local_llm, simulator, tiny_records, tmp_path, monkeypatch):
    """A site built again in its folder is byte for byte the site a fresh build writes, after its
    units changed, came or went, or a file of it was removed or cut; and it writes only the unit
    files whose content changed: none when nothing did."""
    from autoexplain import view

    shards = _two_shards(tiny_records, local_llm, simulator)
    packed_units = []
    original = view.packed
    monkeypatch.setattr(view, "packed", lambda key, *rest: packed_units.append(key) or original(key, *rest))
    site, cache = tmp_path / "site", tmp_path / "cache"

    def rebuild(scores: list[Path], label: str) -> list[str]:
        packed_units.clear()
        build_site(scores, site, cache_dir=cache, plots=False)
        wrote = sorted(packed_units)
        build_site(scores, tmp_path / label, cache_dir=tmp_path / f"cache-{label}", plots=False)
        assert _data_files(site) == _data_files(tmp_path / label), f"the rebuild ({label}) differs from a fresh build"
        return wrote

    assert len(rebuild([shards[0]], "first")) == 4, "a first build writes every unit file"
    assert rebuild([shards[0]], "same") == [], "a rebuild with nothing changed writes no unit file"
    grown = rebuild(shards, "grown")  # units 5+ and 5- come; 1- gets a next unit; similar units change
    assert {"L1/mlp/N5+", "L1/mlp/N5-", "L1/mlp/N1-"} <= set(grown)
    assert rebuild(shards, "grown-again") == []
    assert len(rebuild([shards[1]], "shrunk")) == 2  # 0 and 1 go: their files are removed
    assert not (site / "data" / "L1" / "mlp" / "u" / "0p.js").exists()
    unit_dir = site / "data" / "L1" / "mlp" / "u"
    (unit_dir / "5p.js").unlink()
    (unit_dir / "5n.js").write_bytes((unit_dir / "5n.js").read_bytes()[:100])
    assert rebuild([shards[1]], "repaired") == ["L1/mlp/N5+", "L1/mlp/N5-"], "a missing or cut file is written again"


def _unit_files(site: Path, layer: int) -> dict[str, dict]:
    """Each unit file's unit, by the unit's name in its source (0+, 5-)."""
    from autoexplain.view_pack import unpacked

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
    shards = _two_shards(tiny_records, local_llm, simulator)
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
    assert all(f"scores/{s.name}" in summary for s in shards), "the layer's sources name every shard"

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


def test_a_unit_s_simulations_digest_follows_its_rows_only():
    """The digest that lets a rebuild skip a unit file changes with any of the unit's simulation rows
    (a value, a failure, their order) and with nothing of another unit's."""
    import io
    import subprocess
    import sys

    from autoexplain.view_data import sims_digests

    sims = pl.DataFrame({"unit": [1, 1, 2], "polarity": [1, 1, -1], "method": ["explainer", "shuffled", "explainer"],
                         "window_id": [5, 5, 5], "expected": [[0.5, 1.0], [0.25], [2.0]], "failure": [None, None, None]},
                        schema_overrides={"expected": pl.List(pl.Float32)})
    base = sims_digests(sims)
    assert sims_digests(sims) == base and set(base) == {(1, 1), (2, -1)}
    # A rebuild runs in another process: the hash must not be seeded per process.
    code = ("import sys, polars as pl; from autoexplain.view_data import sims_digests; "
            "print(sorted(sims_digests(pl.read_ipc(sys.stdin.buffer)).items()))")
    buf = io.BytesIO()
    sims.write_ipc(buf)
    done = subprocess.run([sys.executable, "-c", code], input=buf.getvalue(), capture_output=True, check=True)
    assert done.stdout.decode().strip() == str(sorted(base.items()))
    changed = [sims.with_columns(expected=pl.Series([[0.5, 1.01], [0.25], [2.0]], dtype=pl.List(pl.Float32))),
               sims.with_columns(failure=pl.Series([None, "timeout", None], dtype=pl.String)),
               sims[[1, 0, 2]]]
    for other in changed:
        got = sims_digests(other)
        assert got[(1, 1)] != base[(1, 1)] and got[(2, -1)] == base[(2, -1)]
