"""The viewer's three HTML pages: one shell (with its content security policy) and each page's body.

The pages hold no data: `assets/viewer.js` fills them from the data scripts, with `textContent`.
"""

from __future__ import annotations

import html

_CSP = ("default-src 'self' file:; script-src 'self' file:; style-src 'self' file:; img-src 'self' file: data:; "
        "object-src 'none'; base-uri 'none'; form-action 'none'")


def page(kind: str, title: str, body: str) -> str:
    t = html.escape(title)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>{t}</title>
<link rel="stylesheet" href="assets/viewer.css">
</head>
<body data-page="{kind}">
<header class="top"><a class="brand" href="index.html">{t}</a><nav id="crumbs"></nav></header>
<main>
{body}
</main>
<footer>Static site written by autoexplain. Scores are on the held-out test split; CIs are 95% bootstrap intervals over records.</footer>
<script src="data/site.js"></script>
<script src="assets/viewer.js"></script>
</body>
</html>
"""


INDEX_BODY = """<h1>Unit explanations</h1>
<p class="lede" id="overview"></p>
<p id="pages" class="pages"></p>
<section><h2>Layers and sources</h2><p class="muted small">Each cell: units, the distribution of their scores from -1 to 1 (explanation filled, token-lookup baseline as a line), the mean with its 95% CI.</p>
<table class="grid" id="layers"></table></section>
<section><h2>Best explained units</h2><div class="best-grid" id="best"></div></section>
<section class="plots" id="plots"></section>
<section><h2>Search explanations</h2>
<div class="controls"><input id="search" type="search" placeholder="Search explanations in all layers" autocomplete="off" spellcheck="false">
<label>By <select id="search-mode"><option value="text">text</option><option value="meaning">meaning</option></select></label>
<span id="count" class="muted"></span></div>
<table class="grid" id="results"></table></section>"""

LAYER_BODY = """<h1 id="title">Layer</h1>
<p class="lede" id="overview"></p>
<div class="cols">
<section><h2>Score distribution</h2><img id="hist" class="plot" alt="Histogram of unit scores"></section>
<section><h2>Best explained</h2><ol class="units" id="best"></ol><h2>Worst explained</h2><ol class="units" id="worst"></ol></section>
</div>
<section><h2>Units</h2>
<div class="controls">
<input id="search" type="search" placeholder="Filter by explanation text" autocomplete="off" spellcheck="false">
<label>Metric <select id="metric"></select></label>
<span id="count" class="muted"></span>
</div>
<table class="grid sortable" id="units"></table>
<div class="pager" id="pager"></div>
</section>"""

UNIT_BODY = """<div class="unit-head"><h1 id="title">Unit</h1><nav id="unit-nav"></nav></div>
<section class="card"><div class="label">Explanation</div><p class="explanation" id="explanation"></p><p id="headline" class="muted"></p></section>
<div class="cols">
<section><h2>Candidates (best of k on the valid split)</h2><table class="grid" id="candidates"></table></section>
<section><h2>Explanation and baselines</h2><table class="grid" id="baselines"></table></section>
</div>
<section><h2>Similar units (nearest explanations by embedding)</h2><ol class="units" id="similar"></ol></section>
<section><h2>Test scores with 95% CIs</h2><table class="grid" id="scores"></table></section>
<div class="cols">
<section><h2>Activation histogram</h2><div id="histogram"></div><p class="muted" id="stats"></p></section>
<section><h2>What it writes</h2><div id="outputs"></div></section>
<section><h2>Tokens it fires on most</h2><table class="grid" id="top-tokens"></table></section>
</div>
<section><h2>Real and simulated activations (test split)</h2>
<div class="controls"><label><input type="checkbox" id="overlay-toggle"> Overlay</label>
<label>Explanation <select id="sim-method"></select></label><span class="legend" id="sim-legend"></span></div>
<div id="simulations"></div></section>
<section><h2>Top-activating exemplars</h2><div id="ex-top" class="exemplars"></div></section>
<section><h2>Quantile exemplars</h2><div id="ex-quantile" class="exemplars"></div></section>
<section><h2>Random exemplars</h2><div id="ex-random" class="exemplars"></div></section>"""
