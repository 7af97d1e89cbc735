"""Units that never fired (a coder's dead latents) in a run: counted among the run's own units, and a
run whose units all never fired is a finished run that every later command reads (the site, publish)
or refuses in one line (rescore, revise). The tiny SAE's latent 7 never fires (`test_sae_units`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from autoexplain.storage import read_run
from tests.test_cli_runs import cli
from tests.test_sae_units import DEAD
from tests.test_sae_units import tiny_sae  # noqa: F401 (fixture)
from tests.viewer_fixtures import Watched, browser, chromium, file_url  # noqa: F401 (fixtures)

SMALL = ["--tokens", "20000", "--k", "1", "--bootstrap", "50", "--window-len", "8", "--top-k", "8", "--random", "6"]


def _layer_text(browser, site, source: str) -> str:
    w = Watched(browser, file_url(site))
    page = w.open(f"layer.html#{source}")
    page.wait_for_function("document.getElementById('overview').textContent.includes('units')")
    text = page.text_content("#overview")
    w.close()
    return text


@pytest.mark.slow
def test_a_layer_run_counts_its_own_dead_units_and_one_of_dead_units_alone_finishes(tiny_llama_dir, prose_corpus,
                                                                                    tiny_sae, tmp_path, browser):
    home, out = tmp_path / "home", tmp_path / "out"
    sae = shutil.copytree(tiny_sae, tmp_path / "coder" / "res_l1")
    common = ["--source", f"sae:{sae}", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), *SMALL, "--out", str(out)]

    # units 8-9 fired: the recording's dead latent 7 is none of this run's business
    live = cli(home, "explain-layer", "--units", "8-9", *common)
    assert live.returncode == 0, live.stderr[-4000:]
    assert "layer 1 sae-res-40: test-split scores of 2 units" in live.stderr, "a latents run names its source"
    assert "layer 1 (sae-res-40): 2 asked, all fired" in live.stderr
    assert read_run(out, 1, "sae-res-40")["dead"] == []
    assert "never fired" not in _layer_text(browser, out / "site" / "layer_1.sae-res-40", "L1/sae-res-40")
    # `autoexplain view` from the scores folders alone: the run pointer that names them says which died
    from autoexplain.view import build_site

    shards = [Path(r["path"]).parent for r in read_run(out, 1, "sae-res-40")["scores"]]
    build_site(shards, tmp_path / "again", meaning=False, plots=False)
    assert re.search(r'"n_units":2,"n_scored":\d,"dead":\[\]', (tmp_path / "again" / "data" / "site.js").read_text())

    # every unit asked never fired: a finished run that says so, not a traceback
    dead = cli(home, "explain-layer", "--units", f"{DEAD}", *common)
    assert dead.returncode == 0, dead.stderr[-4000:]
    assert "Traceback" not in dead.stderr and "error:" not in dead.stderr
    assert f"layer 1 (sae-res-40): 1 asked, 1 never fired ({DEAD})" in dead.stderr
    assert dead.stderr.count("never fired in the recorded tokens") == 1, "one INFO line for the layer"
    run = read_run(out, 1, "sae-res-40")
    assert run["scores"] == [] and run["explanations"] == [] and run["dead"] == [DEAD]
    assert dead.stdout.strip() == str(out)
    text = _layer_text(browser, out / "site" / "layer_1.sae-res-40", "L1/sae-res-40")
    assert f"All 1 units asked for never fired on the recorded tokens ({DEAD})" in text, text

    # later commands: rescore and revise say in one line there is nothing to redo, before any work
    for args in (["rescore"], ["revise", "--unit", f"{DEAD}", "--text", "x"]):
        refused = cli(home, *args, "--out", str(out), "--source", "sae-res-40")
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "has no explained units: 1 asked, 1 never fired (7)" in refused.stderr, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr and "Flow run" not in refused.stderr
    # publish: the dead unit's statistics, and the card says it never fired
    published = cli(home, "publish", "--out", str(out), "--to", str(tmp_path / "ds"), "--license", "cc-by-4.0")
    assert published.returncode == 0, published.stderr[-3000:]
    units = pl.read_parquet(tmp_path / "ds" / "data" / "units" / "sae-res-40" / "layer_1.parquet")
    assert units["unit"].to_list() == [DEAD] and units["frac_active"].to_list() == [0]
    assert not (tmp_path / "ds" / "data" / "scores").exists()
    assert "layer 1 `sae-res-40`: 1 asked, 1 never fired (7)" in (tmp_path / "ds" / "README.md").read_text()


@pytest.mark.slow
def test_a_model_run_with_a_source_of_dead_units_is_published_and_shown(tiny_llama_dir, prose_corpus, tiny_sae,
                                                                       tmp_path, browser):
    home, out = tmp_path / "home", tmp_path / "out"
    made = cli(home, "explain-model", "--source", "mlp", "--source", f"sae:{tiny_sae}", "--layers", "1",
               "--units", f"{DEAD}", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), *SMALL, "--out", str(out))
    assert made.returncode == 0, made.stderr[-4000:]
    assert read_run(out, 1, "sae-res-40")["dead"] == [DEAD] and read_run(out, 1, "mlp")["dead"] == []

    # the model site shows the source with its dead unit, as report.html counts it
    site = out / "site" / "model"
    text = _layer_text(browser, site, "L1/sae-res-40")
    assert f"All 1 units asked for never fired on the recorded tokens ({DEAD})" in text, text
    assert "unknown layer" not in text

    # publish: the neurons' tables whole, the latents' dead unit in `units`; the card describes latents
    published = cli(home, "publish", "--out", str(out), "--to", str(tmp_path / "ds"), "--license", "cc-by-4.0")
    assert published.returncode == 0, published.stderr[-3000:]
    data = tmp_path / "ds" / "data"
    assert sorted(pl.read_parquet(data / "scores" / "mlp" / "layer_1.parquet")["unit"].unique()) == [DEAD]
    assert pl.read_parquet(data / "units" / "sae-res-40" / "layer_1.parquet")["unit"].to_list() == [DEAD]
    assert [p.name for p in (data / "scores").iterdir()] == ["mlp"]
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "a latent's in its sparse coder" in card and "the neuron's index in the layer's MLP |" not in card
    assert "- layer 1, `sae-res-40`: `" not in card, "import reads these lines as runs it can import"
    back = cli(home, "import", "--from", str(tmp_path / "ds"), "--out", str(tmp_path / "imported"))
    assert back.returncode == 0, back.stderr[-3000:]

    refused = cli(home, "rescore", "--out", str(out), "--source", "sae-res-40")
    assert refused.returncode == 2 and "has no explained units" in refused.stderr, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert json.loads((out / "runs" / "layer_1.sae-res-40.json").read_text())["flow"] == "explain-model"


def _main_in_a_spawned_child(answer) -> None:
    import sys

    from autoexplain.flows.cli import main

    sys.argv = ["autoexplain", "--help"]
    try:
        main()
    except SystemExit:
        answer.put("ran the command")
        return
    answer.put("returned")


def test_a_spawned_child_does_not_run_the_command_again():
    """The embedder's helper is a spawned process that imports the parent's main module with its argv:
    under a console script without the `__main__` guard, main() there ran the whole flow a second time."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    answer = ctx.Queue()
    child = ctx.Process(target=_main_in_a_spawned_child, args=(answer,))
    child.start()
    child.join(120)
    assert answer.get(timeout=5) == "returned"
