/* autoexplain neuron viewer. No framework, no network: data comes from data/*.js files that set
   window.__data[key], loaded on demand with <script> tags (works from file:// and from a server).
   Data is only ever put into the page with textContent / attributes, never parsed as HTML. */
(function () {
  "use strict";

  var D = (window.__data = window.__data || {});
  var SITE = D.site || { sources: [], metrics: [], methods: [], plots: [] };
  var PAGE_SIZE = 100;
  var SVGNS = "http://www.w3.org/2000/svg";
  var METRIC_LABELS = {
    top_and_random: "Correlation (top + random)",
    random_only: "Correlation (random only)",
    calibrated_r2: "Calibrated R²",
    calibrated_abs_dev_explained: "Calibrated abs. dev. explained",
    detection_auc: "Detection AUC"
  };

  /* ------------------------------------------------------------ helpers */

  var pending = {};
  function load(key, src) {
    if (D[key] !== undefined) return Promise.resolve(D[key]);
    if (pending[key]) return pending[key];
    pending[key] = new Promise(function (resolve, reject) {
      var s = document.createElement("script");
      s.src = src;
      s.async = true;
      s.onload = function () {
        s.remove();
        if (D[key] === undefined) reject(new Error("no data in " + src));
        else resolve(D[key]);
      };
      s.onerror = function () {
        s.remove();
        delete pending[key];
        reject(new Error("could not load " + src));
      };
      document.head.appendChild(s);
    });
    return pending[key];
  }

  function el(tag, props) {
    var e = document.createElement(tag);
    var k;
    if (props) {
      for (k in props) {
        if (!Object.prototype.hasOwnProperty.call(props, k) || props[k] == null) continue;
        if (k === "text") e.textContent = String(props[k]);
        else if (k === "cls") e.className = props[k];
        else if (k === "title") e.title = String(props[k]);
        else if (k === "onclick") e.addEventListener("click", props[k]);
        else e.setAttribute(k, String(props[k]));
      }
    }
    for (var i = 2; i < arguments.length; i++) add(e, arguments[i]);
    return e;
  }
  function add(parent) {
    for (var i = 1; i < arguments.length; i++) {
      var child = arguments[i];
      if (child == null || child === false) continue;
      if (Array.isArray(child)) child.forEach(function (c) { add(parent, c); });
      else if (typeof child === "string" || typeof child === "number") parent.appendChild(document.createTextNode(String(child)));
      else parent.appendChild(child);
    }
    return parent;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, String(attrs[k]));
    return e;
  }
  function $(id) { return document.getElementById(id); }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function fmt(v, d) {
    if (v === null || v === undefined || typeof v !== "number" || !isFinite(v)) return "–";
    return v.toFixed(d === undefined ? 3 : d);
  }
  function fmtg(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
    return v.toPrecision(3);
  }
  function ci(lo, hi) { return (lo == null || hi == null) ? "" : "[" + fmt(lo) + ", " + fmt(hi) + "]"; }
  function sign(p) { return p > 0 ? "+" : "-"; }
  /* Unit names mirror autoexplain.view_data.unit_page / unit_file: "L15/mlp/N12+" (a source read with
     two polarities), "L15/sae-res-16k/N12" (one-signed); the data file spells the sign as p / n. */
  var SOURCE_RE = "L(\\d+)/([A-Za-z0-9][A-Za-z0-9_-]*)";
  function marker(meta, p) { return (meta && meta.polar) || p < 0 ? sign(p) : ""; }
  function pageName(meta, u, p) { return meta.source + "/N" + u + marker(meta, p); }
  function parseUnit(name) {
    var m = new RegExp("^(" + SOURCE_RE + ")/N(\\d+)([+-]?)$").exec(name);
    if (!m) {
      // Links of sites built before units were named by source: L15/N12+ is neuron 12 of L15/mlp.
      m = /^L(\d+)\/N(\d+)([+-])$/.exec(name);
      if (!m) return null;
      return parseUnit("L" + m[1] + "/mlp/N" + m[2] + m[3]);
    }
    return { source: m[1], layer: parseInt(m[2], 10), kind: m[3], u: parseInt(m[4], 10), p: m[5] === "-" ? -1 : 1, marker: m[5] };
  }
  function unitFile(unit) { return "data/" + unit.source + "/u/" + unit.u + ({ "+": "p", "-": "n", "": "" })[unit.marker] + ".js"; }
  function unitLabel(name) { var x = parseUnit(name); return x ? "N" + x.u + x.marker : name; }
  function unitHref(name) { return "unit.html#" + name; }
  function layerHref(source) { return "layer.html#" + source; }
  function metricLabel(m) { return METRIC_LABELS[m] || m; }
  function showToken(t) { return String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, ""); }
  function scoreClass(v, metric) {
    if (v == null) return "s-none";
    if (metric === "detection_auc") v = 2 * (v - 0.5);
    return v >= 0.5 ? "s-high" : v >= 0.2 ? "s-mid" : v > 0 ? "s-low" : "s-neg";
  }
  function fail(where, err) {
    add(clear(where), el("p", { cls: "error", text: String(err && err.message ? err.message : err) }));
  }
  function crumbs(items) {
    var nav = clear($("crumbs"));
    items.forEach(function (it, i) {
      if (i) add(nav, el("span", { cls: "sep", text: "›" }));
      add(nav, it[1] ? el("a", { href: it[1], text: it[0] }) : el("span", { text: it[0] }));
    });
  }
  function sourceMeta(source) {
    for (var i = 0; i < SITE.sources.length; i++) if (SITE.sources[i].source === source) return SITE.sources[i];
    return null;
  }
  function sourceTitle(meta) { return "Layer " + meta.layer + " · " + meta.kind; }
  /* A unit file: {"z": base64 of gzip of the unit's JSON}, inflated by the browser. */
  function inflate(packed) {
    var bin = atob(packed.z), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text().then(JSON.parse);
  }
  function int8(b64) {
    var bin = atob(b64), out = new Int8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i) << 24 >> 24;
    return out;
  }
  function loadLayerIndex(meta, progress) {
    var done = 0;
    var jobs = [];
    for (var k = 0; k < meta.n_chunks; k++) {
      jobs.push(load(meta.source + "/index/" + k, "data/" + meta.source + "/index_" + k + ".js").then(function (c) {
        done += 1;
        if (progress) progress(done, meta.n_chunks);
        return c;
      }));
    }
    return Promise.all(jobs).then(function (chunks) {
      var rows = [];
      chunks.forEach(function (c) {
        for (var i = 0; i < c.u.length; i++) rows.push({ meta: meta, layer: meta.layer, name: pageName(meta, c.u[i], c.p[i]), c: c, i: i, u: c.u[i], p: c.p[i], t: c.t[i], lt: c.t[i].toLowerCase() });
      });
      return rows;
    });
  }
  function val(row, metric, field) { return row.c.m[metric][field][row.i]; }
  function unitLink(name) { return el("a", { href: unitHref(name), cls: "unit-link", text: unitLabel(name) }); }
  function matcher(query) {
    var words = query.toLowerCase().split(/\s+/).filter(Boolean);
    return function (row) {
      for (var i = 0; i < words.length; i++) if (row.lt.indexOf(words[i]) < 0) return false;
      return true;
    };
  }
  function debounce(fn, ms) {
    var t = null;
    return function () { var a = arguments; clearTimeout(t); t = setTimeout(function () { fn.apply(null, a); }, ms); };
  }
  function meanText(m) { return m ? fmt(m[0]) + " " + ci(m[1], m[2]) : "–"; }
  // Dollars with 4 significant digits and no exponent: a unit can cost a hundredth of a cent.
  function money(d) { return d == null ? "unknown" : "$" + (d === 0 ? "0" : d >= 1 ? d.toFixed(2) : parseFloat(d.toPrecision(4)).toFixed(Math.min(20, 3 - Math.floor(Math.log10(d || 1))))); }
  function costText(c) {
    if (!c || !c.units) return "–";
    var known = c.units - c.unknown;
    return (c.dollars == null ? "unknown" : money(c.dollars) + " (" + money(c.per_unit) + " per unit)") +
      (c.unknown ? "; " + c.unknown + " of " + c.units + " units without a price" : "") + (known && c.dollars === 0 ? " · local models" : "");
  }

  /* ------------------------------------------------------------ index page */

  function indexPage() {
    crumbs([["Overview", null]]);
    var n = 0, layers = [], kinds = [];
    SITE.sources.forEach(function (s) {
      n += s.n_units;
      if (layers.indexOf(s.layer) < 0) layers.push(s.layer);
      if (kinds.indexOf(s.kind) < 0) kinds.push(s.kind);
    });
    $("overview").textContent = layers.length + (layers.length === 1 ? " layer, " : " layers, ") + kinds.length +
      (kinds.length === 1 ? " source (" : " sources (") + kinds.join(", ") + "), " + n.toLocaleString("en") +
      " units. Score: " + metricLabel(SITE.metric) + " of the chosen explanation's simulation on held-out test records.";

    // Layers x sources: each cell a score histogram (explanation filled, token-lookup outlined) and the mean.
    var t = clear($("layers"));
    add(t, el("thead", null, el("tr", null, el("th", { text: "Layer" }), kinds.map(function (k) { return el("th", { text: k }); }))));
    var tb = el("tbody");
    layers.forEach(function (L) {
      var tr = el("tr", { "data-layer": L }, el("td", { text: "Layer " + L }));
      kinds.forEach(function (k) {
        var s = sourceMeta("L" + L + "/" + k);
        if (!s) { add(tr, el("td", { cls: "muted", text: "–" })); return; }
        var m = s.means[SITE.metric];
        add(tr, el("td", { cls: "cell", "data-source": s.source },
          el("a", { href: layerHref(s.source), text: s.n_units.toLocaleString("en") + " units" }),
          miniHistogram(s.hist),
          el("div", { cls: "num", text: "mean " + meanText(m.explainer) }),
          el("div", { cls: "muted small", text: "lookup " + (m["token-lookup"] ? fmt(m["token-lookup"][0]) : "–") +
            " · beats lookup " + (s.llm_beats["token-lookup"] == null ? "–" : Math.round(100 * s.llm_beats["token-lookup"]) + "%") +
            " · " + s.simulator }),
          el("div", { cls: "muted small cost", text: "cost " + costText(s.cost) })));
      });
      add(tb, tr);
    });
    add(t, tb);

    var best = clear($("best"));
    SITE.sources.forEach(function (s) {
      var ol = el("ol", { cls: "units" });
      (s.best || []).forEach(function (r) {
        add(ol, el("li", null, unitLink(r.n), el("span", { cls: "num score " + scoreClass(r.v), text: fmt(r.v) }), el("span", { cls: "expl", text: r.t })));
      });
      if (!(s.best || []).length) add(ol, el("li", { cls: "muted", text: "no scored units" }));
      add(best, el("div", { cls: "best-of", "data-source": s.source }, el("h3", null, el("a", { href: layerHref(s.source), text: sourceTitle(s) })), ol));
    });

    var pages = clear($("pages"));
    (SITE.pages || []).forEach(function (p, i) {
      if (i) add(pages, document.createTextNode(" · "));
      add(pages, el("a", { href: p[0], text: p[1] }));
    });

    var plots = clear($("plots"));
    (SITE.plots || []).forEach(function (p) {
      add(plots, el("figure", null, el("img", { src: p[0], alt: p[1], cls: "plot" }), el("figcaption", { text: p[1] })));
    });

    var all = null, meaning = null;
    var search = $("search"), mode = $("search-mode");
    if (!SITE.meaning) { mode.value = "text"; mode.disabled = true; mode.title = "the site was built without embeddings"; }
    function loadAll() {
      if (all) return Promise.resolve(all);
      $("count").textContent = "loading the index…";
      return Promise.all(SITE.sources.map(function (s) { return loadLayerIndex(s); })).then(function (parts) {
        all = [].concat.apply([], parts);
        return all;
      });
    }
    function loadMeaning() {
      if (meaning) return Promise.resolve(meaning);
      return Promise.all([load("words", "data/words.js")].concat(SITE.sources.map(function (s) {
        return load(s.source + "/meaning", "data/" + s.source + "/meaning.js");
      }))).then(function (parts) {
        var w = parts[0], index = {};
        w.words.forEach(function (x, i) { index[x] = i; });
        meaning = { dims: w.dims, words: index, wv: int8(w.v), sv: parts.slice(1).map(function (x) { return int8(x.v); }) };
        return meaning;
      });
    }
    function table(rows, scoreHead, extra) {
      var results = clear($("results"));
      add(results, el("thead", null, el("tr", null, ["Layer", "Source", "Unit", "Explanation", "Score"].concat(scoreHead ? [scoreHead] : []).map(function (h) { return el("th", { text: h }); }))));
      var body = el("tbody");
      rows.forEach(function (r, j) {
        var v = val(r, SITE.metric, "v");
        add(body, el("tr", null, el("td", { text: String(r.layer) }), el("td", { text: r.meta.kind }), el("td", null, unitLink(r.name)),
          el("td", { cls: "expl", text: r.t }), el("td", { cls: "num " + scoreClass(v), text: fmt(v) }),
          scoreHead ? el("td", { cls: "num", text: fmt(extra[j], 2) }) : null));
      });
      add(results, body);
    }
    var run = debounce(function () {
      var q = search.value.trim();
      clear($("results"));
      if (!q) { $("count").textContent = ""; return; }
      if (mode.value === "meaning") {
        Promise.all([loadAll(), loadMeaning()]).then(function (got) {
          var rows = got[0], mm = got[1], dims = mm.dims;
          var words = (q.toLowerCase().match(/[a-z][a-z0-9']+/g) || []), used = [], qv = new Float64Array(dims);
          words.forEach(function (w) {
            var i = mm.words[w];
            if (i === undefined) return;
            used.push(w);
            for (var d = 0; d < dims; d++) qv[d] += mm.wv[i * dims + d];
          });
          if (!used.length) { $("count").textContent = "none of these words is in the vocabulary of the search by meaning"; return; }
          var hits = [], k = 0;
          mm.sv.forEach(function (v) {
            var nrow = v.length / dims;
            for (var i = 0; i < nrow; i++, k++) {
              var dot = 0, norm = 0;
              for (var d = 0; d < dims; d++) { var x = v[i * dims + d]; dot += x * qv[d]; norm += x * x; }
              if (norm > 0) hits.push([dot / Math.sqrt(norm), k]);
            }
          });
          var qn = 0;
          for (var d = 0; d < dims; d++) qn += qv[d] * qv[d];
          hits.sort(function (a, b) { return b[0] - a[0]; });
          hits = hits.slice(0, 50);
          $("count").textContent = "the 50 explanations nearest in meaning to “" + used.join(" ") + "”" +
            (used.length < words.length ? " (not in the vocabulary: " + words.filter(function (w) { return used.indexOf(w) < 0; }).join(", ") + ")" : "");
          table(hits.map(function (h) { return rows[h[1]]; }), "Similarity", hits.map(function (h) { return h[0] / Math.sqrt(qn); }));
        }).catch(function (e) { fail($("results"), e); });
        return;
      }
      loadAll().then(function (rows) {
        var hits = rows.filter(matcher(q));
        $("count").textContent = hits.length.toLocaleString("en") + " matching units" + (hits.length > 200 ? " (first 200 shown)" : "");
        table(hits.slice(0, 200));
      }).catch(function (e) { fail($("results"), e); });
    }, 150);
    search.addEventListener("input", run);
    mode.addEventListener("change", run);
    document.body.setAttribute("data-ready", "1");
  }

  function miniHistogram(h) {
    var w = 160, ht = 40, box = svg("svg", { viewBox: "0 0 " + w + " " + ht, "class": "mini-hist", role: "img" });
    if (!h) return box;
    var n = h.explainer.length, maxc = 1;
    h.explainer.concat(h["token-lookup"] || []).forEach(function (c) { maxc = Math.max(maxc, c); });
    var title = svg("title", {});
    title.textContent = "scores from " + h.edges[0] + " to " + h.edges[n] + ": explanation (filled), token-lookup (line)";
    box.appendChild(title);
    for (var i = 0; i < n; i++) {
      var bh = (ht - 2) * h.explainer[i] / maxc;
      box.appendChild(svg("rect", { x: (i * w / n).toFixed(1), y: (ht - bh).toFixed(1), width: (w / n - 1).toFixed(1), height: bh.toFixed(1), fill: h.edges[i] >= 0 ? "rgb(" + REAL + ")" : "#9aa3ad" }));
    }
    if (h["token-lookup"]) {
      var pts = h["token-lookup"].map(function (c, i) { return ((i + 0.5) * w / n).toFixed(1) + "," + (ht - (ht - 2) * c / maxc).toFixed(1); });
      box.appendChild(svg("polyline", { points: pts.join(" "), fill: "none", stroke: "#2463eb", "stroke-width": 1.2 }));
    }
    box.appendChild(svg("line", { x1: w / 2, x2: w / 2, y1: 0, y2: ht, stroke: "#bbb", "stroke-dasharray": "2,2" }));
    return box;
  }

  /* ------------------------------------------------------------ layer page */

  // The ids of units that never fired, all of them when few.
  function deadIds(dead) {
    var shown = dead.slice(0, 10).join(", ");
    return dead.length > 10 ? shown + " and " + (dead.length - 10).toLocaleString("en") + " more" : shown;
  }

  function layerPage() {
    var hash = location.hash || "";
    try { hash = decodeURIComponent(hash); } catch (e) { /* keep it encoded: it will not match */ }
    // #L15/mlp; #L15 (links of older sites) is the layer's first source.
    var meta = !hash ? SITE.sources[0] : sourceMeta(hash.slice(1)) ||
      (/^#L\d+$/.test(hash) ? SITE.sources.filter(function (s) { return "#L" + s.layer === hash; })[0] : null);
    if (!meta) { crumbs([["Overview", "index.html"]]); return fail($("overview"), "unknown layer or source " + hash); }
    var L = meta.layer, S = meta.source;
    document.title = sourceTitle(meta) + " · " + document.title;
    crumbs([["Overview", "index.html"], [sourceTitle(meta), null]]);
    $("title").textContent = sourceTitle(meta);
    var others = SITE.sources.filter(function (l) { return l.source !== S; });
    if (others.length) {
      var nav = el("span", { cls: "layer-nav" }, "Other layers and sources: ");
      others.forEach(function (l, i) { if (i) add(nav, " · "); add(nav, el("a", { href: layerHref(l.source), text: l.layer + "/" + l.kind })); });
      add($("title").parentNode.insertBefore(el("p", { cls: "muted" }), $("overview")), nav);
    }
    window.addEventListener("hashchange", function () { location.reload(); });

    var state = { metric: SITE.metric, key: "unit", desc: false, page: 0, rows: [], shown: [], query: "" };
    load(S + "/summary", "data/" + S + "/summary.js").then(function (s) {
      var mm = s.means[SITE.metric];
      var ov = clear($("overview"));
      add(ov, s.n_units.toLocaleString("en") + " units, " + s.n_scored.toLocaleString("en") + " scored. Mean score " + meanText(mm.explainer) +
        "; token-lookup " + (mm["token-lookup"] ? fmt(mm["token-lookup"][0]) : "–") + ", shuffled " + (mm.shuffled ? fmt(mm.shuffled[0]) : "–") + ". ");
      if (s.dead && s.dead.length) add(ov, el("span", { id: "dead", text: (s.n_units ? s.dead.length.toLocaleString("en") + " more" : "All " + s.dead.length.toLocaleString("en") + " units asked for") +
        " never fired on the recorded tokens (" + deadIds(s.dead) + "): they have no exemplars and are not explained. " }));
      if (s.llm_beats["token-lookup"] != null) add(ov, "The explanation beats the token-lookup baseline on " + Math.round(100 * s.llm_beats["token-lookup"]) + "% of units. ");
      if (s.simulator) add(ov, el("span", { cls: "muted", text: "Simulator: " + s.simulator + ". " }));
      if (s.cost && s.cost.units) add(ov, el("span", { cls: "muted", id: "layer-cost", text: "Cost: " + costText(s.cost) + "." }));
      if (s.plot) $("hist").setAttribute("src", s.plot);
      else $("hist").parentNode.hidden = true;
      [["best", s.best], ["worst", s.worst]].forEach(function (pair) {
        var ol = clear($(pair[0]));
        if (!pair[1].length) add(ol, el("li", { cls: "muted", text: "no scored units" }));
        pair[1].forEach(function (r) {
          add(ol, el("li", null, unitLink(r.n), el("span", { cls: "num score " + scoreClass(r.v), text: fmt(r.v) }),
            el("span", { cls: "expl", text: r.t })));
        });
      });
    }).catch(function (e) { fail($("overview"), e); });

    var sel = $("metric");
    SITE.metrics.forEach(function (x) { add(sel, el("option", { value: x, text: metricLabel(x) })); });
    sel.value = state.metric;
    sel.addEventListener("change", function () { state.metric = sel.value; if (state.key !== "unit" && state.key !== "text") sortRows(); render(); });

    var columns = [
      { key: "unit", label: "Unit" },
      { key: "text", label: "Explanation" },
      { key: "score", label: "Score" },
      { key: "ci", label: "95% CI" },
      { key: "token-lookup", label: "Token-lookup" },
      { key: "shuffled", label: "Shuffled" }
    ];
    var table = $("units");
    var headRow = el("tr");
    columns.forEach(function (c) {
      var th = el("th", { "data-key": c.key, tabindex: "0", role: "button", title: "Sort by " + c.label.toLowerCase() }, c.label, el("span", { cls: "arrow" }));
      var go = function () {
        if (state.key === c.key) state.desc = !state.desc;
        else { state.key = c.key; state.desc = c.key !== "unit" && c.key !== "text"; }
        state.page = 0;
        sortRows();
        render();
      };
      th.addEventListener("click", go);
      th.addEventListener("keydown", function (ev) { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); go(); } });
      add(headRow, th);
    });
    add(table, el("thead", null, headRow));
    var tbody = el("tbody");
    add(table, tbody);

    function sortValue(r) {
      switch (state.key) {
        case "unit": return r.u * 2 + (r.p > 0 ? 0 : 1);
        case "text": return r.lt;
        case "score": return val(r, state.metric, "v");
        case "ci": var lo = val(r, state.metric, "lo"), hi = val(r, state.metric, "hi"); return (lo == null || hi == null) ? null : hi - lo;
        default: return val(r, state.metric, state.key);
      }
    }
    function sortRows() {
      var dir = state.desc ? -1 : 1;
      state.rows.sort(function (a, b) {
        var x = sortValue(a), y = sortValue(b);
        if (x == null && y == null) return a.u - b.u || b.p - a.p;
        if (x == null) return 1;
        if (y == null) return -1;
        if (x < y) return -dir;
        if (x > y) return dir;
        return a.u - b.u || b.p - a.p;
      });
    }
    function filter() {
      var q = $("search").value.trim();
      state.query = q;
      state.shown = q ? state.rows.filter(matcher(q)) : state.rows;
    }
    function render() {
      filter();
      headRow.childNodes.forEach(function (th) {
        var on = th.getAttribute("data-key") === state.key;
        th.setAttribute("aria-sort", on ? (state.desc ? "descending" : "ascending") : "none");
        th.lastChild.textContent = on ? (state.desc ? " ▼" : " ▲") : "";
      });
      var n = state.shown.length;
      var pages = Math.max(1, Math.ceil(n / PAGE_SIZE));
      if (state.page >= pages) state.page = pages - 1;
      var start = state.page * PAGE_SIZE;
      clear(tbody);
      var frag = document.createDocumentFragment();
      state.shown.slice(start, start + PAGE_SIZE).forEach(function (r) {
        var v = val(r, state.metric, "v");
        var vc = scoreClass(v, state.metric);
        frag.appendChild(el("tr", { "data-unit": r.u, "data-polarity": r.p },
          el("td", null, unitLink(r.name)),
          el("td", { cls: "expl", text: r.t }),
          el("td", { cls: "num " + vc, text: fmt(v) }),
          el("td", { cls: "num muted", text: ci(val(r, state.metric, "lo"), val(r, state.metric, "hi")) }),
          el("td", { cls: "num", text: fmt(val(r, state.metric, "token-lookup")) }),
          el("td", { cls: "num", text: fmt(val(r, state.metric, "shuffled")) })));
      });
      tbody.appendChild(frag);
      $("count").textContent = (state.query ? n.toLocaleString("en") + " of " + state.rows.length.toLocaleString("en") + " units match" : n.toLocaleString("en") + " units");
      var pager = clear($("pager"));
      if (pages > 1) {
        add(pager, el("button", { id: "prev-page", type: "button", onclick: function () { state.page -= 1; render(); } }, "‹ Previous"));
        pager.lastChild.disabled = state.page === 0;
        add(pager, el("span", { cls: "muted", text: "rows " + (start + 1).toLocaleString("en") + "–" + Math.min(n, start + PAGE_SIZE).toLocaleString("en") + " of " + n.toLocaleString("en") }));
        add(pager, el("button", { id: "next-page", type: "button", onclick: function () { state.page += 1; render(); } }, "Next ›"));
        pager.lastChild.disabled = state.page >= pages - 1;
      }
    }
    $("search").addEventListener("input", debounce(function () { state.page = 0; render(); }, 120));
    $("count").textContent = "loading…";
    loadLayerIndex(meta, function (done, total) { $("count").textContent = "loading " + done + "/" + total + " index files…"; })
      .then(function (rows) {
        state.rows = rows;
        sortRows();
        render();
        document.body.setAttribute("data-ready", "1");
      }).catch(function (e) { fail($("pager"), e); });
  }

  /* ------------------------------------------------------------ unit page */

  function heat(a, scale, rgb) {
    if (a == null || !(scale > 0) || a <= 0) return "transparent";
    var x = Math.min(1, a / scale);
    if (x < 0.02) return "transparent";
    return "rgba(" + rgb + "," + (0.08 + 0.72 * x).toFixed(3) + ")";
  }
  var REAL = "22,163,74", SIM = "234,88,12";

  function tokenRow(tokens, acts, scale, rgb) {
    var line = el("div", { cls: "tokens" });
    for (var i = 0; i < tokens.length; i++) {
      var a = acts ? acts[i] : null;
      var span = el("span", { cls: "tok", title: "“" + showToken(tokens[i]) + "”  " + fmtg(a), text: showToken(tokens[i]) });
      span.style.backgroundColor = heat(a, scale, rgb);
      line.appendChild(span);
    }
    return line;
  }

  /* Overlay: above each token, two bars (real, simulated), each scaled to its own maximum. */
  function overlayRow(tokens, real, sim, realScale, simScale) {
    var line = el("div", { cls: "tokens overlaid" });
    var bar = function (v, scale, cls) {
      var b = el("span", { cls: "bar " + cls });
      var x = (v == null || !(scale > 0)) ? 0 : Math.max(0, Math.min(1, v / scale));
      b.style.height = (x > 0 ? Math.round(1 + 25 * x) : 0) + "px";
      return b;
    };
    for (var i = 0; i < tokens.length; i++) {
      var t = el("span", { cls: "tok", text: showToken(tokens[i]) });
      t.style.backgroundColor = heat(real[i], realScale, REAL);
      line.appendChild(el("span", { cls: "otok", title: "“" + showToken(tokens[i]) + "”  real " + fmtg(real[i]) + ", simulated " + fmtg(sim[i]) },
        el("span", { cls: "bars" }, bar(real[i], realScale, "real"), bar(sim[i], simScale, "sim")), t));
    }
    return line;
  }

  function histogram(stats) {
    var counts = stats.hist_counts || [], edges = stats.hist_edges || [];
    if (!counts.length || edges.length !== counts.length + 1) return el("p", { cls: "muted", text: "no histogram recorded" });
    var w = 420, h = 150, left = 36, bottom = 22, top = 6;
    var box = svg("svg", { viewBox: "0 0 " + w + " " + h, "class": "hist", role: "img" });
    var title = svg("title", {});
    title.textContent = "histogram of activations over a uniform sample of windows (log count)";
    box.appendChild(title);
    var lo = edges[0], hi = edges[edges.length - 1], span = (hi - lo) || 1;
    var maxc = 0;
    counts.forEach(function (c) { maxc = Math.max(maxc, c); });
    var lmax = Math.log10(maxc + 1) || 1;
    var X = function (v) { return left + (w - left - 6) * (v - lo) / span; };
    for (var i = 0; i < counts.length; i++) {
      var bh = (h - bottom - top) * Math.log10(counts[i] + 1) / lmax;
      var x0 = X(edges[i]), x1 = X(edges[i + 1]);
      var r = svg("rect", { x: x0.toFixed(2), y: (h - bottom - bh).toFixed(2), width: Math.max(0.5, x1 - x0 - 0.5).toFixed(2), height: bh.toFixed(2), fill: edges[i] >= 0 ? "rgb(" + REAL + ")" : "#9aa3ad" });
      var tt = svg("title", {});
      tt.textContent = fmtg(edges[i]) + " to " + fmtg(edges[i + 1]) + ": " + counts[i];
      r.appendChild(tt);
      box.appendChild(r);
    }
    box.appendChild(svg("line", { x1: left, x2: w - 6, y1: h - bottom, y2: h - bottom, stroke: "#666" }));
    var ticks = [lo, hi];
    if (lo < 0 && hi > 0) ticks.splice(1, 0, 0);
    ticks.forEach(function (v, i) {
      var t = svg("text", { x: X(v).toFixed(1), y: h - 6, "text-anchor": i === 0 ? "start" : i === ticks.length - 1 ? "end" : "middle", "class": "axis" });
      t.textContent = fmtg(v);
      box.appendChild(t);
    });
    return box;
  }

  function exemplarBlock(recs, scale, label) {
    var wrap = el("div");
    if (!recs.length) { add(wrap, el("p", { cls: "muted", text: "none recorded" })); return wrap; }
    recs.forEach(function (r) {
      add(wrap, el("div", { cls: "exemplar" },
        el("div", { cls: "ex-label", title: "window " + r.w + ", split " + r.s, text: label(r) }),
        tokenRow(r.t, r.a, scale, REAL)));
    });
    return wrap;
  }

  function unitPage() {
    var state = { data: null };
    var toggle = $("overlay-toggle"), methodSel = $("sim-method");
    toggle.addEventListener("change", function () { drawSims(); });
    methodSel.addEventListener("change", function () { drawSims(); });
    window.addEventListener("hashchange", route);
    route();

    function route() {
      var hash = location.hash || "";
      try { hash = decodeURIComponent(hash); } catch (e) { /* keep it encoded: it will not match */ }
      var unit = parseUnit(hash.slice(1));
      if (!unit) {
        blank();
        crumbs([["Overview", "index.html"]]);
        return fail($("explanation"), "no such unit: open a unit from a layer page (unit.html#L<layer>/<source>/N<unit>)");
      }
      var meta = sourceMeta(unit.source);
      if (meta && !unit.marker && meta.polar) unit.marker = "+";
      var name = unit.source + "/N" + unit.u + unit.marker;
      if (hash.slice(1) !== name && window.history && history.replaceState) history.replaceState(null, "", "#" + name);
      var label = "N" + unit.u + unit.marker;
      crumbs([["Overview", "index.html"], [meta ? sourceTitle(meta) : unit.source, layerHref(unit.source)], [label, null]]);
      $("title").textContent = "Layer " + unit.layer + " · " + unit.kind + " · " + label;
      document.title = name + " · " + (SITE.title || "autoexplain");
      document.body.removeAttribute("data-ready");
      document.body.setAttribute("data-unit", name);
      blank();  // the unit routed from must not stay on the page, above an error for this one
      if (!meta) return fail($("explanation"), "layer " + unit.layer + " has no source " + unit.kind + " in this site");
      load(name, unitFile(unit)).then(inflate).then(function (d) {
        // A later hash may have routed elsewhere while this unit loaded: its page must not be drawn over.
        if (document.body.getAttribute("data-unit") !== name) return;
        // Activations come as multiples of the unit's step, simulations in hundredths.
        var step = d.step || 0;
        (d.records || []).forEach(function (r) {
          r.a = (r.a || []).map(function (q) { return q == null ? null : q * step; });
          var s = d.sims && Object.prototype.hasOwnProperty.call(d.sims, String(r.w)) ? d.sims[String(r.w)] : null;
          if (s) {
            r.sim = {};
            Object.keys(s.sim).forEach(function (mth) { r.sim[mth] = s.sim[mth] && s.sim[mth].map(function (v) { return v == null ? null : v / 100; }); });
            if (s.fail) r.fail = s.fail;
          }
        });
        state.data = d;
        draw(d);
        document.body.setAttribute("data-ready", "1");
      }).catch(function (e) { fail($("explanation"), e); });
    }

    // Every section a unit's data fills, emptied as a fresh page has them.
    function blank() {
      state.data = null;
      ["unit-nav", "explanation", "headline", "candidates", "baselines", "similar", "scores", "histogram", "stats",
        "outputs", "top-tokens", "sim-method", "sim-legend", "simulations", "ex-top", "ex-quantile", "ex-random"]
        .forEach(function (id) { clear($(id)); });
    }

    function draw(d) {
      var nav = clear($("unit-nav"));
      var link = function (name, text, id) {
        if (!name) return el("span", { cls: "muted", text: text });
        return el("a", { href: unitHref(name), text: text, id: id });
      };
      add(nav, link(d.prev, "‹ previous", "prev-unit"), d.other ? link(d.other, d.polarity > 0 ? "negative polarity" : "positive polarity", "other-polarity") : null, link(d.next, "next ›", "next-unit"));

      var sim = clear($("similar"));
      (d.similar || []).forEach(function (r) {
        add(sim, el("li", null, unitLink(r[0]), el("span", { cls: "muted small", text: " " + parseUnit(r[0]).source + " " }),
          el("span", { cls: "num score " + scoreClass(r[2]), text: fmt(r[2]) }), el("span", { cls: "expl", text: r[1] }),
          el("span", { cls: "muted small", text: " (cosine " + fmt(r[3], 2) + ")" })));
      });
      if (!(d.similar || []).length) add(sim, el("li", { cls: "muted", text: SITE.meaning ? "no other explained units" : "the site was built without embeddings" }));

      var ex = d.explanations || {};
      var llm = ex.explainer || { text: "" };
      $("explanation").textContent = d.dead ? "N" + d.unit + " never fired on the recorded tokens: it has no exemplars and no explanation"
        : llm.text || "(no explanation)";
      var sc = (d.scores || {}).explainer || {};
      var head = sc[SITE.metric];
      $("headline").textContent = head ? (metricLabel(SITE.metric) + ": " + fmt(head[0]) + " " + ci(head[1], head[2]) +
        (head[3] ? " (undefined: " + head[3] + ")" : "") + " on " + head[4] + " test records" + (llm.explainer ? " · explainer " + llm.explainer : "") +
        ("cost" in d ? " · cost " + money(d.cost) : "")) : "not scored";

      var cands = clear($("candidates"));
      add(cands, el("thead", null, el("tr", null, el("th", { text: "#" }), el("th", { text: "Candidate" }), el("th", { text: "Valid score" }))));
      var cb = el("tbody");
      (llm.candidates || []).forEach(function (c, i) {
        var chosen = c[0] === llm.text;
        add(cb, el("tr", { cls: chosen ? "chosen" : null }, el("td", { cls: "num", text: String(i + 1) }),
          el("td", { cls: "expl" }, c[0], chosen ? el("span", { cls: "badge", text: "chosen" }) : null),
          el("td", { cls: "num", text: fmt(c[1]) })));
      });
      if (!(llm.candidates || []).length) add(cb, el("tr", null, el("td", { colspan: 3, cls: "muted", text: "no candidates" })));
      add(cands, cb);

      var bl = clear($("baselines"));
      add(bl, el("thead", null, el("tr", null, el("th", { text: "Method" }), el("th", { text: "Explanation" }))));
      var bb = el("tbody");
      SITE.methods.forEach(function (mth) {
        if (!ex[mth]) return;
        add(bb, el("tr", null, el("td", { text: mth }), el("td", { cls: "expl", text: ex[mth].text })));
      });
      add(bl, bb);

      var st = clear($("scores"));
      add(st, el("thead", null, el("tr", null, el("th", { text: "Metric" }), SITE.methods.map(function (mth) { return el("th", { text: mth }); }))));
      var sb = el("tbody");
      SITE.metrics.forEach(function (metric) {
        var tr = el("tr", null, el("td", { text: metricLabel(metric) }));
        SITE.methods.forEach(function (mth) {
          var s = ((d.scores || {})[mth] || {})[metric];
          var td = el("td", { cls: "num" });
          if (!s) add(td, "–");
          else if (s[0] == null) add(td, el("span", { cls: "muted", title: s[3] || "", text: "undefined" }));
          else add(td, el("span", { cls: scoreClass(s[0], metric), text: fmt(s[0]) }), el("span", { cls: "muted ci", text: " " + ci(s[1], s[2]) }));
          add(tr, td);
        });
        add(sb, tr);
      });
      add(st, sb);

      var hist = clear($("histogram"));
      if (d.stats) {
        add(hist, histogram(d.stats), el("p", { cls: "muted small", text: "Counts on a log scale, over a uniform sample of windows; green bars are positive (firing)." }));
        var s2 = d.stats;
        $("stats").textContent = "mean " + fmtg(s2.mean) + " · std " + fmtg(s2.std) + " · max " + fmtg(s2.max) +
          " · active on " + fmt(100 * (s2.frac_active || 0), 1) + "% of tokens · skewness " + fmtg(s2.skewness) + " · kurtosis " + fmtg(s2.kurtosis);
      } else {
        add(hist, el("p", { cls: "muted", text: "no statistics (records not available)" }));
        $("stats").textContent = "";
      }

      var outs = clear($("outputs"));
      if (d.outputs) {
        var tokens = function (label, rows, cls) {
          var p = el("p", null, el("strong", { text: label + ": " }));
          rows.forEach(function (r) { add(p, el("span", { cls: "tok " + cls, title: "logit " + fmtg(r[1]), text: showToken(r[0]) }), " "); });
          return p;
        };
        var names = function (label, list) { return el("p", { cls: "muted small", text: label + ": " + (list || []).map(showToken).join(" ") }); };
        add(outs, tokens("Promotes", d.outputs.promotes, "up"), tokens("Suppresses", d.outputs.suppresses, "down"),
          el("p", { cls: "muted small", text: "Its output direction times the unembedding, without the final norm (as Neuronpedia shows it); logits per unit of activation on hover. With the final norm applied:" }),
          names("promotes", d.outputs.promotes_normed), names("suppresses", d.outputs.suppresses_normed));
      } else add(outs, el("p", { cls: "muted", text: "not recorded (a recording from before the output side)" }));

      var tt = clear($("top-tokens"));
      add(tt, el("thead", null, el("tr", null, ["Token", "Max", "Mean", "Seen", "Peaks"].map(function (h) { return el("th", { text: h }); }))));
      var tb = el("tbody");
      (d.top_tokens || []).filter(function (r) { return r[1] > 0; }).forEach(function (r) {
        var tok = el("span", { cls: "tok", text: showToken(r[0]) });
        tok.style.backgroundColor = heat(r[1], d.scale, REAL);
        add(tb, el("tr", null, el("td", null, tok), el("td", { cls: "num", text: fmtg(r[1]) }), el("td", { cls: "num", text: fmtg(r[2]) }),
          el("td", { cls: "num", text: String(r[3]) }), el("td", { cls: "num", text: String(r[4]) })));
      });
      if (!(d.top_tokens || []).length) add(tb, el("tr", null, el("td", { colspan: 5, cls: "muted", text: "no records" })));
      add(tt, tb);

      var methods = SITE.methods.filter(function (mth) { return d.records.some(function (r) { return r.sim && r.sim[mth] !== undefined; }); });
      var prev = methodSel.value;
      clear(methodSel);
      methods.forEach(function (mth) { add(methodSel, el("option", { value: mth, text: mth })); });
      if (methods.indexOf(prev) >= 0) methodSel.value = prev;
      drawSims();

      var recs = d.records || [];
      var n = d.n_records || {};
      var byKind = function (k) { return recs.filter(function (r) { return r.k === k; }); };
      var topRecs = byKind("top"), qRecs = byKind("quantile"), rRecs = byKind("random");
      var note = function (k, shown) { return (n[k] && n[k] > shown) ? el("p", { cls: "muted", text: "showing " + shown + " of " + n[k] }) : null; };
      add(clear($("ex-top")), note("top", topRecs.length), exemplarBlock(topRecs, d.scale, function (r) { return "#" + (r.i + 1) + " " + r.s + " · " + fmtg(r.m); }));
      qRecs.sort(function (a, b) { return (b.q || 0) - (a.q || 0) || b.m - a.m; });
      var pct = function (x) { return +(100 * x).toFixed(1) + "%"; };
      var bins = (SITE.quantile_bins || []).map(function (b) { return pct(b[0]) + "–" + pct(b[1]); });
      add(clear($("ex-quantile")), exemplarBlock(qRecs, d.scale, function (r) { return (r.q == null ? "?" : (bins[r.q] || r.q)) + " · " + fmtg(r.m); }));
      add(clear($("ex-random")), note("random", rRecs.length), exemplarBlock(rRecs, d.scale, function (r) { return r.s + " · " + fmtg(r.m); }));
    }

    function drawSims() {
      var d = state.data;
      var box = clear($("simulations"));
      if (!d) return;
      var mth = methodSel.value;
      var recs = (d.records || []).filter(function (r) { return r.sim && r.sim[mth] !== undefined; });
      recs.sort(function (a, b) { return (a.k === b.k ? 0 : a.k === "top" ? -1 : 1) || b.m - a.m; });
      var simScale = 0;
      recs.forEach(function (r) { (r.sim[mth] || []).forEach(function (v) { if (v != null && v > simScale) simScale = v; }); });
      var overlay = toggle.checked;
      box.className = overlay ? "sims overlay" : "sims side-by-side";
      var legend = clear($("sim-legend"));
      var sw = function (rgb) { var s = el("span", { cls: "swatch" }); s.style.backgroundColor = "rgb(" + rgb + ")"; return s; };
      add(legend, sw(REAL), " real (max " + fmtg(d.scale) + ")  ", sw(SIM), " simulated (max " + fmtg(simScale) + ")");
      legend.hidden = !recs.length;
      if (!recs.length) { add(box, el("p", { cls: "muted", text: "no simulations for this unit" })); return; }
      if (!overlay) add(box, el("div", { cls: "sim-row sim-head" }, el("div", { cls: "ex-label" }), el("div", { text: "Real" }), el("div", { text: "Simulated" })));
      recs.forEach(function (r) {
        var sim = r.sim[mth];
        var label = el("div", { cls: "ex-label", title: "window " + r.w, text: r.k + " · " + fmtg(r.m) });
        if (!sim) {
          add(box, el("div", { cls: "sim-row" }, label, tokenRow(r.t, r.a, d.scale, REAL),
            el("div", { cls: "muted", text: "simulation failed" + (r.fail && r.fail[mth] ? ": " + r.fail[mth] : "") })));
        } else if (overlay) {
          add(box, el("div", { cls: "sim-row" }, label, overlayRow(r.t, r.a, sim, d.scale, simScale)));
        } else {
          add(box, el("div", { cls: "sim-row" }, label, tokenRow(r.t, r.a, d.scale, REAL), tokenRow(r.t, sim, simScale, SIM)));
        }
      });
    }
  }

  /* ------------------------------------------------------------ start */

  var page = document.body.getAttribute("data-page");
  try {
    if (page === "index") indexPage();
    else if (page === "layer") layerPage();
    else if (page === "unit") unitPage();
  } catch (e) {
    add(document.querySelector("main"), el("p", { cls: "error", text: "viewer error: " + e.message }));
    throw e;
  }
})();
