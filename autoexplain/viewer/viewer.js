/* autoexplain neuron viewer. No framework, no network: data comes from data/*.js files that set
   window.__data[key], loaded on demand with <script> tags (works from file:// and from a server).
   Data is only ever put into the page with textContent / attributes, never parsed as HTML. */
(function () {
  "use strict";

  var D = (window.__data = window.__data || {});
  var SITE = D.site || { layers: [], metrics: [], methods: [], plots: [] };
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
  function unitName(u, p) { return "N" + u + sign(p); }
  function unitHref(layer, u, p) { return "unit.html#L" + layer + "/N" + u + sign(p); }
  function layerHref(layer) { return "layer.html#L" + layer; }
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
  function layerMeta(layer) {
    for (var i = 0; i < SITE.layers.length; i++) if (SITE.layers[i].layer === layer) return SITE.layers[i];
    return null;
  }
  function loadLayerIndex(meta, progress) {
    var done = 0;
    var jobs = [];
    for (var k = 0; k < meta.n_chunks; k++) {
      jobs.push(load("L" + meta.layer + "/index/" + k, "data/L" + meta.layer + "/index_" + k + ".js").then(function (c) {
        done += 1;
        if (progress) progress(done, meta.n_chunks);
        return c;
      }));
    }
    return Promise.all(jobs).then(function (chunks) {
      var rows = [];
      chunks.forEach(function (c) {
        for (var i = 0; i < c.u.length; i++) rows.push({ layer: meta.layer, c: c, i: i, u: c.u[i], p: c.p[i], t: c.t[i], lt: c.t[i].toLowerCase() });
      });
      return rows;
    });
  }
  function val(row, metric, field) { return row.c.m[metric][field][row.i]; }
  function unitLink(layer, u, p) { return el("a", { href: unitHref(layer, u, p), cls: "unit-link", text: unitName(u, p) }); }
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
    var n = 0;
    SITE.layers.forEach(function (l) { n += l.n_units; });
    $("overview").textContent = SITE.layers.length + (SITE.layers.length === 1 ? " layer, " : " layers, ") + n.toLocaleString("en") +
      " units (neuron and polarity). Score: " + metricLabel(SITE.metric) + " of the chosen explanation's simulation on held-out test records.";
    var t = clear($("layers"));
    add(t, el("thead", null, el("tr", null, ["Layer", "Units", "Mean score [95% CI]", "Token-lookup", "Shuffled", "Beats lookup", "Simulator", "Cost"].map(function (h) { return el("th", { text: h }); }))));
    var tb = el("tbody");
    SITE.layers.forEach(function (l) {
      var m = l.means[SITE.metric];
      add(tb, el("tr", null,
        el("td", null, el("a", { href: layerHref(l.layer), text: "Layer " + l.layer })),
        el("td", { cls: "num", text: l.n_units.toLocaleString("en") }),
        el("td", { cls: "num", text: meanText(m.explainer) }),
        el("td", { cls: "num", text: m["token-lookup"] ? fmt(m["token-lookup"][0]) : "–" }),
        el("td", { cls: "num", text: m.shuffled ? fmt(m.shuffled[0]) : "–" }),
        el("td", { cls: "num", text: l.llm_beats["token-lookup"] == null ? "–" : Math.round(100 * l.llm_beats["token-lookup"]) + "%" }),
        el("td", { cls: "muted", text: l.simulator }),
        el("td", { cls: "num cost", text: costText(l.cost) })));
    });
    add(t, tb);
    var plots = clear($("plots"));
    (SITE.plots || []).forEach(function (p) {
      add(plots, el("figure", null, el("img", { src: p[0], alt: p[1], cls: "plot" }), el("figcaption", { text: p[1] })));
    });

    var all = null;
    var search = $("search");
    var run = debounce(function () {
      var q = search.value.trim();
      var results = clear($("results"));
      if (!q) { $("count").textContent = ""; return; }
      var go = function (rows) {
        var hits = rows.filter(matcher(q));
        $("count").textContent = hits.length.toLocaleString("en") + " matching units" + (hits.length > 200 ? " (first 200 shown)" : "");
        add(results, el("thead", null, el("tr", null, ["Layer", "Unit", "Explanation", "Score"].map(function (h) { return el("th", { text: h }); }))));
        var tb = el("tbody");
        hits.slice(0, 200).forEach(function (r) {
          var v = val(r, SITE.metric, "v");
          add(tb, el("tr", null, el("td", { text: String(r.layer) }), el("td", null, unitLink(r.layer, r.u, r.p)),
            el("td", { cls: "expl", text: r.t }), el("td", { cls: "num " + scoreClass(v), text: fmt(v) })));
        });
        add(results, tb);
      };
      if (all) return go(all);
      $("count").textContent = "loading the index…";
      Promise.all(SITE.layers.map(function (l) { return loadLayerIndex(l); })).then(function (parts) {
        all = [].concat.apply([], parts);
        go(all);
      }).catch(function (e) { fail(results, e); });
    }, 150);
    search.addEventListener("input", run);
    document.body.setAttribute("data-ready", "1");
  }

  /* ------------------------------------------------------------ layer page */

  function layerPage() {
    var m = /^#L(\d+)$/.exec(location.hash || "");
    var meta = m ? layerMeta(parseInt(m[1], 10)) : SITE.layers[0];
    if (!meta) { crumbs([["Overview", "index.html"]]); return fail($("overview"), "unknown layer " + location.hash); }
    var L = meta.layer;
    document.title = "Layer " + L + " · " + document.title;
    crumbs([["Overview", "index.html"], ["Layer " + L, null]]);
    $("title").textContent = "Layer " + L;
    var others = SITE.layers.filter(function (l) { return l.layer !== L; });
    if (others.length) {
      var nav = el("span", { cls: "layer-nav" }, "Other layers: ");
      others.forEach(function (l, i) { if (i) add(nav, " · "); add(nav, el("a", { href: layerHref(l.layer), text: String(l.layer) })); });
      add($("title").parentNode.insertBefore(el("p", { cls: "muted" }), $("overview")), nav);
    }
    window.addEventListener("hashchange", function () { location.reload(); });

    var state = { metric: SITE.metric, key: "unit", desc: false, page: 0, rows: [], shown: [], query: "" };
    load("L" + L + "/summary", "data/L" + L + "/summary.js").then(function (s) {
      var mm = s.means[SITE.metric];
      var ov = clear($("overview"));
      add(ov, s.n_units.toLocaleString("en") + " units, " + s.n_scored.toLocaleString("en") + " scored. Mean score " + meanText(mm.explainer) +
        "; token-lookup " + (mm["token-lookup"] ? fmt(mm["token-lookup"][0]) : "–") + ", shuffled " + (mm.shuffled ? fmt(mm.shuffled[0]) : "–") + ". ");
      if (s.llm_beats["token-lookup"] != null) add(ov, "The explanation beats the token-lookup baseline on " + Math.round(100 * s.llm_beats["token-lookup"]) + "% of units. ");
      if (s.simulator) add(ov, el("span", { cls: "muted", text: "Simulator: " + s.simulator + ". " }));
      if (s.cost && s.cost.units) add(ov, el("span", { cls: "muted", id: "layer-cost", text: "Cost: " + costText(s.cost) + "." }));
      if (s.plot) $("hist").setAttribute("src", s.plot);
      else $("hist").parentNode.hidden = true;
      [["best", s.best], ["worst", s.worst]].forEach(function (pair) {
        var ol = clear($(pair[0]));
        if (!pair[1].length) add(ol, el("li", { cls: "muted", text: "no scored units" }));
        pair[1].forEach(function (r) {
          add(ol, el("li", null, unitLink(L, r.u, r.p), el("span", { cls: "num score " + scoreClass(r.v), text: fmt(r.v) }),
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
          el("td", null, unitLink(L, r.u, r.p)),
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
      var m = /^#L(\d+)\/N(\d+)([+-])$/.exec(hash);
      if (!m) {
        crumbs([["Overview", "index.html"]]);
        return fail($("explanation"), "no such unit: open a unit from a layer page (unit.html#L<layer>/N<unit>+)");
      }
      var L = parseInt(m[1], 10), u = parseInt(m[2], 10), p = m[3] === "+" ? 1 : -1;
      crumbs([["Overview", "index.html"], ["Layer " + L, layerHref(L)], [unitName(u, p), null]]);
      $("title").textContent = "Layer " + L + " · " + unitName(u, p);
      document.title = "L" + L + " " + unitName(u, p) + " · " + (SITE.title || "autoexplain");
      document.body.removeAttribute("data-ready");
      var meta = layerMeta(L);
      if (!meta) return fail($("explanation"), "layer " + L + " is not in this site");
      var block = Math.floor(u / (meta.unit_block || 1));
      load("L" + L + "/u/" + block, "data/L" + L + "/u/" + block + ".js").then(function (group) {
        var d = Object.prototype.hasOwnProperty.call(group, u + sign(p)) ? group[u + sign(p)] : null;
        if (!d) throw new Error("unit " + unitName(u, p) + " is not in layer " + L);
        // Simulations come apart from the exemplars (those are reused across re-simulations).
        (d.records || []).forEach(function (r) {
          var s = d.sims && Object.prototype.hasOwnProperty.call(d.sims, String(r.w)) ? d.sims[String(r.w)] : null;
          if (s) { r.sim = s.sim; if (s.fail) r.fail = s.fail; }
        });
        state.data = d;
        draw(d);
        document.body.setAttribute("data-ready", "1");
      }).catch(function (e) { fail($("explanation"), e); });
    }

    function draw(d) {
      var L = d.layer;
      var nav = clear($("unit-nav"));
      var link = function (key, text, id) {
        if (!key) return el("span", { cls: "muted", text: text });
        var m = /^L(\d+)\/N(\d+)([+-])$/.exec(key);
        return el("a", { href: unitHref(parseInt(m[1], 10), parseInt(m[2], 10), m[3] === "+" ? 1 : -1), text: text, id: id });
      };
      add(nav, link(d.prev, "‹ previous", "prev-unit"), link(d.other, d.polarity > 0 ? "negative polarity" : "positive polarity", "other-polarity"), link(d.next, "next ›", "next-unit"));

      var ex = d.explanations || {};
      var llm = ex.explainer || { text: "" };
      $("explanation").textContent = llm.text || "(no explanation)";
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
