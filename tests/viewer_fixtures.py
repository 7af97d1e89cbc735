"""The viewer tests' machinery: Chromium driven by Playwright, a static http server, and the sites.

Three sites: a real run of the pipeline on the tiny Llama (`real_site`); a hostile run whose corpus,
tokens and explanations carry HTML/JS payloads (`hostile_site`); and a synthetic layer of any size
(`synthetic_layer`), written with the schemas and no model. `tests/test_view.py` imports the
fixtures, so they stay module-scoped there.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from playwright.sync_api import expect

from autoexplain import pipeline
from autoexplain.layout import input_of
from autoexplain.storage import read_manifest
from autoexplain.tables import write_table
from autoexplain.store import seal_folder
from autoexplain.view import build_site
from autoexplain.schemas import load_schema

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAYLOADS = [
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=1">',
    "javascript:window.__pwned=1",
    "</script><script>window.__pwned=1</script>",
    "<svg/onload=window.__pwned=1>",
    "'--><iframe srcdoc='<script>parent.__pwned=1</script>'>",
    "<!--<img src=x onerror=alert(1)>-->",
    "\u2028window.__pwned=1\u2029",
]
INJECTED = "<img src=x onerror=window.__pwned=1>"


# ---------------------------------------------------------------- browser


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium; installed with apt when missing and we are root."""
    if not Path(CHROMIUM).exists() and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
                       shell=True, check=False, capture_output=True, timeout=900)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the viewer tests need Chromium at {CHROMIUM}: run `apt-get install -y chromium` as root "
                    "(Playwright's own browser download is not used)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        # Playwright's waits are deadlock guards, not speed limits: generous, so that a loaded machine
        # is never a failure (page speed is printed by test_46080_units_page_search_sort_and_open).
        ctx.set_default_timeout(180_000)
        expect.set_options(timeout=180_000)  # the same for expect(...), whose own default is 5 s
        yield ctx
        expect.set_options(timeout=None)  # back to Playwright's default for other modules
        ctx.close()


class Watched:
    """A page whose console errors, page errors, dialogs and off-site requests are recorded."""

    def __init__(self, ctx, base: str):
        self.page = ctx.new_page()
        self.base = base
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.offsite: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.page.on("request", lambda r: r.url.startswith(self.base) or self.offsite.append(r.url))

    def _dialog(self, d):
        self.dialogs.append(d.message)
        d.dismiss()

    def open(self, path: str, ready: bool = True):
        self.page.goto(self.base + path)
        if ready:
            self.page.wait_for_selector("body[data-ready='1']")
        return self.page

    def check_clean(self):
        assert self.page.evaluate("typeof window.__pwned") == "undefined", "injected script ran"
        assert self.page.evaluate("typeof parent.__pwned") == "undefined"
        assert not self.dialogs, f"a dialog fired: {self.dialogs}"
        assert not self.errors, f"console errors: {self.errors}"
        assert not self.offsite, f"requests outside the site: {self.offsite}"
        # Only our own plots are images; nothing injected became an element.
        assert self.page.evaluate("document.querySelectorAll('img:not(.plot), iframe, object, embed').length") == 0
        assert self.page.evaluate("document.querySelectorAll('script:not([src])').length") == 0

    def close(self):
        self.check_clean()
        self.page.close()


@pytest.fixture(scope="module")
def serve():
    """serve(site_dir) -> http://127.0.0.1:PORT/ for a static server over that folder."""
    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    def start(site: Path) -> str:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def file_url(site: Path) -> str:
    return site.resolve().as_uri() + "/"


def rows_shown(page) -> int:
    return page.locator("#units tbody tr").count()


# ---------------------------------------------------------------- sites


@pytest.fixture(scope="module")
def simulator():
    from autoexplain.embedding import EmbeddingSimulator

    return EmbeddingSimulator()


@pytest.fixture(scope="module")
def local_llm(tiny_llama_dir):
    from autoexplain.llm_local import LocalLLM

    return LocalLLM(tiny_llama_dir)


@pytest.fixture(scope="module")
def real_site(tiny_records, local_llm, simulator, tmp_path_factory):
    """Layer 1 of the tiny Llama, explained, simulated and scored (same stages as test_pipeline)."""
    from autoexplain.layer import run_explain, run_score, run_simulate

    records_dir, out = tiny_records
    x = run_explain(records_dir, 1, out, [0, 5], cfg=pipeline.ExplainConfig(k=3, max_tokens=12), llm=local_llm)
    s = run_simulate(records_dir, x, out, sim=simulator)
    c = run_score(records_dir, s, out, n_boot=200)
    site = tmp_path_factory.mktemp("site_real")
    started = time.perf_counter()
    build_site([c.directory], site)
    print(f"\nreal site built in {time.perf_counter() - started:.2f}s")
    return site, s, c


@pytest.fixture(scope="module")
def hostile_site(tiny_llama_dir, local_llm, simulator, tmp_path_factory):
    """Two layers recorded over a corpus full of HTML/JS payloads, whose tokens and explanations carry them."""
    from autoexplain.layer import run_explain, run_score, run_simulate
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject
    from tests.conftest import PROSE

    root = tmp_path_factory.mktemp("hostile")
    corpus = root / "corpus.jsonl"  # 14 documents (as one .txt file it would be 2: too few for the splits)
    corpus.write_text("".join(json.dumps({"text": f"{PROSE} {PAYLOADS[i % len(PAYLOADS)]} and "
                                                  f"{PAYLOADS[(i + 3) % len(PAYLOADS)]}"}) + "\n"
                              for i in range(14)), encoding="utf-8")
    out = root / "out"
    subject = load_subject(tiny_llama_dir)
    windows = build_windows(subject, str(corpus), out, window_len=8, seed=0)
    refs = {layer: record_layers(subject, windows, RecordConfig([layer], top_k=8, n_random=6, quantile_per_bin=1,
                                                                reservoir=32), out) for layer in (0, 2)}
    # Whole payloads as single tokens too (the tokenizer splits them), before anything reads the tokens.
    table = pl.read_parquet(windows.path)
    tokens = [[PAYLOADS[(w + j) % len(PAYLOADS)] if j == 3 else t for j, t in enumerate(toks)]
              for w, toks in zip(table["window_id"], table["tokens"])]
    write_table(table.with_columns(pl.Series("tokens", tokens)).to_arrow(), windows.path, "windows")
    reseal(windows.path.parent)

    llm = local_llm
    scores = []
    for layer in (0, 2):
        records = refs[layer].directory
        x = run_explain(records, layer, out, [0, 1, 2], cfg=pipeline.ExplainConfig(k=2, max_tokens=8), llm=llm)
        s = run_simulate(records, x, out, sim=simulator)
        c = run_score(records, s, out, n_boot=50)
        scores.append(c.directory)
    # And the explanation texts themselves, as a compromised explainer would write them.
    chosen_path = input_of(scores[0], read_manifest(scores[0])["inputs"]["simulations"]) / "chosen.parquet"
    rows = pq.read_table(chosen_path).to_pylist()
    for row in rows:
        if (row["unit"], row["polarity"]) == (0, 1) and row["method"] == "explainer":
            row["candidates"] = [INJECTED] + PAYLOADS[:2]
            row["candidate_valid_scores"] = [0.5, 0.1, float("nan")]
            row["text"] = INJECTED
        elif row["method"] != "explainer":
            row["text"] = PAYLOADS[row["unit"] % len(PAYLOADS)] + " " + row["text"]
    write_table(pa.Table.from_pylist(rows, schema=load_schema("explanations")), chosen_path, "explanations")
    reseal(chosen_path.parent)
    site = root / "site"
    build_site(scores, site)
    return site


def reseal(directory: Path) -> None:
    """Seal a folder again after the test changed its files on purpose: the store refuses a folder
    whose files no longer match their manifest's digests."""
    m = read_manifest(directory)
    seal_folder(directory, m["stage"], m["key"], m["inputs"], m["params"], list(m["outputs"]))


def synthetic_layer(out: Path, layer: int, n_neurons: int, seed: int = 0) -> Path:
    """Scores and chosen explanations for n_neurons x 2 polarities, written with the schemas; no model."""
    rng = np.random.default_rng(seed)
    units = np.repeat(np.arange(n_neurons), 2)
    pols = np.tile([1, -1], n_neurons)
    n = units.size
    words = "river mill bridge winter school teacher numbers dates commas names colours animals verbs".split()
    texts = [f"{words[i % len(words)]} and {words[(i * 7 + 3) % len(words)]} in text {i}" for i in range(n)]
    chosen = {c: [] for c in load_schema("explanations").names}
    for method in pipeline.EXPLAINER, pipeline.LOOKUP, pipeline.SHUFFLED:
        t = texts if method != pipeline.SHUFFLED else texts[1:] + texts[:1]
        chosen["layer"] += [layer] * n
        chosen["unit"] += units.tolist()
        chosen["polarity"] += pols.tolist()
        chosen["method"] += [method] * n
        chosen["explainer"] += [method] * n
        chosen["prompt_hash"] += [""] * n
        chosen["text"] += t
        chosen["candidates"] += [[x, x + " (alternative)"] for x in t]
        chosen["candidate_valid_scores"] += (rng.uniform(-0.2, 0.8, (n, 2)).round(3).tolist()
                                             if method == pipeline.EXPLAINER else [[]] * n)
        chosen["prompt_tokens"] += [0] * n
        chosen["completion_tokens"] += [0] * n
        chosen["failure"] += [None] * n
        chosen["dollars"] += [0.0] * n
        chosen["selection_tokens"] += [0] * n
        chosen["selection_dollars"] += [0.0] * n
    sims_dir = out / "simulations" / f"synthetic{layer}"
    write_table(pa.table(chosen), sims_dir / "chosen.parquet", "explanations")
    write_table(load_schema("simulations").empty_table(), sims_dir / f"layer_{layer}.parquet", "simulations")
    seal_folder(sims_dir, "simulations", f"synthetic{layer}", {}, {"layer": layer, "simulator": "synthetic"},
                   ["chosen.parquet", f"layer_{layer}.parquet"])

    metrics = ["top_and_random", "random_only", "calibrated_r2", "calibrated_abs_dev_explained", "detection_auc"]
    parts = []
    for method, centre in ((pipeline.EXPLAINER, 0.25), (pipeline.LOOKUP, 0.15), (pipeline.SHUFFLED, 0.0)):
        for metric in metrics:
            lo, hi = (0, 1) if metric == "detection_auc" else (-1, 1)  # an AUC is a probability
            v = np.clip(rng.normal(centre + (0.5 if metric == "detection_auc" else 0.0), 0.2, n), lo, hi)
            v[rng.random(n) < 0.01] = np.nan
            parts.append(pl.DataFrame({"unit": units, "polarity": pols, "method": method, "metric": metric,
                                       "value": v, "ci_low": np.maximum(v - 0.1, lo), "ci_high": np.minimum(v + 0.1, hi)}))
    df = pl.concat(parts).with_columns(
        layer=pl.lit(layer), simulator=pl.lit("synthetic"), split=pl.lit("test"),
        undefined_reason=pl.when(pl.col("value").is_nan()).then(pl.lit("no spread")).otherwise(None),
        n_records=pl.lit(20), n_failed=pl.lit(0), explainer_tokens=pl.lit(0), simulator_tokens=pl.lit(0),
        dollars=pl.lit(0.0),
    ).with_columns([pl.col(c).fill_nan(None) for c in ("value", "ci_low", "ci_high")])
    scores_dir = out / "scores" / f"synthetic{layer}"
    write_table(df.select(load_schema("scores").names).to_arrow(), scores_dir / f"layer_{layer}.parquet", "scores")
    seal_folder(scores_dir, "scores", f"synthetic{layer}", {"simulations": str(sims_dir)}, {"layer": layer},
                   [f"layer_{layer}.parquet"])
    return scores_dir
