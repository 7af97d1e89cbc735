"""The viewer at the scale of a whole model: bytes per unit, and the time to open pages in Chromium.

1. Builds the site of a finished explain-layer run (`--out ROOT --layer L`) and reports its build
   time, the bytes of each unit file and what else the site folder holds (nothing hidden).
2. Synthesises a site of `--units` units (default 92,160: 30 layers x 3,072, the embedded model) from
   that site's units: each real unit file is copied to other layers and neuron numbers, its names
   and links rewritten and recompressed (the content, exemplars and all, stays the real unit's).
3. Opens pages of the large site in Chromium (Debian's, through Playwright), from file:// and over
   http: the overview, a layer, `--samples` unit pages picked at random (each in a fresh tab, so
   nothing is cached in the page), and a search by meaning over every unit. Times are wall-clock,
   from navigation to the page's `data-ready` mark.

    PYTHONPATH=. python bench/view_bench.py --out OUT --layer 15 --work /tmp/view-bench
"""

from __future__ import annotations

import argparse
import base64
import functools
import gzip
import http.server
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from autoexplain.storage import read_run
from autoexplain.view import build_site
from autoexplain.view_data import js_data

NAME = re.compile(r"L(\d+)/mlp/N(\d+)")


def _rewrite(text: str, layer: int, shift: int) -> str:
    return NAME.sub(lambda m: f"L{layer}/mlp/N{int(m.group(2)) + shift}", text)


def _copy_unit(job) -> int:
    """One real unit file as unit `index + shift` of `layer`; returns the new file's bytes. Only the
    script's key changes: the compressed unit inside is the real one byte for byte (rewriting and
    recompressing 92,160 of them would take most of an hour on two cores), so the page shows the
    real unit's content and links under the copy's address: the same bytes to read and inflate."""
    src, dst, layer, shift = job
    text = Path(src).read_text()
    key, rest = text.split("]=", 1)
    data = (_rewrite(key, layer, shift) + "]=" + rest).encode("ascii")
    Path(dst).write_bytes(data)
    return len(data)


def _data(path: Path):
    return json.loads(path.read_text(encoding="utf-8").split("]=", 1)[1].rstrip(";\n"))


def synthesise(site: Path, big: Path, n_units: int, workers: int) -> dict:
    """Copy `site` (one source, L<layer>/mlp) to `big` with n_units units over as many layers as it takes."""
    if big.exists():
        shutil.rmtree(big)
    shutil.copytree(site, big)
    meta = _data(big / "data" / "site.js")
    real = meta["sources"][0]
    real_dir = site / "data" / real["source"]  # read from the real site: `big` is written over
    files = sorted((real_dir / "u").iterdir())
    per_layer = 3072
    copies = max(1, per_layer // len(files))  # copies of the real units in one layer
    n_layers = -(-n_units // (copies * len(files)))
    stride = max(int(re.match(r"\d+", f.name).group()) for f in files) + 1
    jobs, sources = [], []
    for layer in range(n_layers):
        source = f"L{layer}/mlp"
        sdir = big / "data" / source
        (sdir / "u").mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            for f in files:
                if len(jobs) == n_units:
                    break
                number = int(re.match(r"\d+", f.name).group())
                jobs.append((str(f), str(sdir / "u" / f"{number + c * stride}{f.name[len(str(number)):]}"), layer, c * stride))
        _layer_tables(real_dir, sdir, real, layer, copies, stride)
        summary = _data(sdir / "summary.js")
        sources.append({**real, "layer": layer, "source": source, "n_units": summary["n_units"],
                        "n_scored": summary["n_scored"], "n_chunks": summary["n_chunks"],
                        "best": [{**b, "n": _rewrite(b["n"], layer, 0)} for b in real["best"]]})
    if real["layer"] >= n_layers:
        shutil.rmtree(big / "data" / real["source"])
    meta["sources"] = sources
    (big / "data" / "site.js").write_text(js_data("site", meta), encoding="utf-8")
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_copy_unit, jobs, chunksize=256))
    return {"units": len(sizes), "layers": n_layers, "copy_seconds": round(time.perf_counter() - started, 1),
            "mean_bytes": round(statistics.mean(sizes)), "max_bytes": max(sizes), "jobs": jobs}


def _layer_tables(real_dir: Path, sdir: Path, real: dict, layer: int, copies: int, stride: int) -> None:
    """The index rows, explanation vectors and summary of a synthetic layer: the real ones, once per copy."""
    import base64

    chunks = [_data(real_dir / f"index_{k}.js") for k in range(real["n_chunks"])]
    rows = {"u": [], "p": [], "t": [], "m": None}
    for c in range(copies):
        for ch in chunks:
            rows["u"] += [u + c * stride for u in ch["u"]]
            rows["p"] += ch["p"]
            rows["t"] += ch["t"]
            if rows["m"] is None:
                rows["m"] = {m: {f: [] for f in fields} for m, fields in ch["m"].items()}
            for m, fields in ch["m"].items():
                for f, values in fields.items():
                    rows["m"][m][f] += values
    size, source = real["chunk_size"], f"L{layer}/mlp"
    n = len(rows["u"])
    for k in range(-(-n // size)):
        part = {"u": rows["u"][k * size:(k + 1) * size], "p": rows["p"][k * size:(k + 1) * size],
                "t": rows["t"][k * size:(k + 1) * size],
                "m": {m: {f: v[k * size:(k + 1) * size] for f, v in fields.items()} for m, fields in rows["m"].items()}}
        (sdir / f"index_{k}.js").write_text(js_data(f"{source}/index/{k}", part), encoding="utf-8")
    meaning = _data(real_dir / "meaning.js")
    meaning["v"] = base64.b64encode(base64.b64decode(meaning["v"]) * copies).decode("ascii")
    (sdir / "meaning.js").write_text(js_data(f"{source}/meaning", meaning), encoding="utf-8")
    summary = _data(real_dir / "summary.js")
    summary.update(source=source, layer=layer, n_units=n, n_scored=summary["n_scored"] * copies, n_chunks=-(-n // size))
    summary = json.loads(_rewrite(json.dumps(summary), layer, 0))
    (sdir / "summary.js").write_text(js_data(f"{source}/summary", summary), encoding="utf-8")


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def time_pages(big: Path, jobs: list, samples: int, seed: int) -> dict:
    from playwright.sync_api import sync_playwright

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(big)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    bases = {"file": big.resolve().as_uri() + "/", "http": f"http://127.0.0.1:{httpd.server_address[1]}/"}
    picks = random.Random(seed).sample(jobs, samples)
    names = []
    for src, dst, layer, shift in picks:
        m = re.match(r"(\d+)([pn]?)\.js", Path(dst).name)
        names.append(f"L{layer}/mlp/N{m.group(1)}{ {'p': '+', 'n': '-', '': ''}[m.group(2)] }")
    out = {}
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(big.parent / "chromium-profile"), executable_path="/usr/bin/chromium",
                                                   headless=True, args=["--headless", "--no-sandbox", "--disable-gpu"])
        ctx.set_default_timeout(300_000)

        def timed(url, then=None):
            page = ctx.new_page()
            started = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            if then:
                then(page)
            took = time.perf_counter() - started
            page.close()
            return took

        for via, base in bases.items():
            timed(base + "unit.html#" + names[0])  # the browser's own start-up, not counted
            unit = [timed(base + "unit.html#" + n) for n in names]
            out[via] = {"unit_median_s": round(statistics.median(unit), 3), "unit_max_s": round(max(unit), 3),
                        "overview_s": round(timed(base + "index.html"), 3),
                        "layer_s": round(timed(base + "layer.html#L0/mlp"), 3)}

            def meaning(page):
                page.select_option("#search-mode", "meaning")
                page.fill("#search", "numbers and dates")
                page.wait_for_selector("#results tbody tr")

            out[via]["search_by_meaning_s"] = round(timed(base + "index.html", meaning), 3)
        ctx.close()
    httpd.shutdown()
    out["samples"] = samples
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output root of a finished explain-layer run")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--work", default="/tmp/view-bench")
    ap.add_argument("--units", type=int, default=92_160)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = read_run(Path(args.out), args.layer)
    scores = [Path(s["path"]).parent for s in run["scores"]]

    site = work / "site"
    started = time.perf_counter()
    build_site(scores, site)
    built = time.perf_counter() - started
    unit_files = list((site / "data").rglob("u/*.js"))
    sizes = sorted(p.stat().st_size for p in unit_files)
    raw = [len(gzip.decompress(base64.b64decode(_data(p)["z"]))) for p in unit_files[:50]]
    report = {"real_site": {"units": len(sizes), "build_seconds": round(built, 1), "site_bytes": du(site),
                            "unit_mean_bytes": round(statistics.mean(sizes)), "unit_max_bytes": sizes[-1],
                            "unit_json_mean_bytes": round(statistics.mean(raw)),
                            "hidden": [str(p.relative_to(site)) for p in site.rglob(".*")],
                            "top_level": sorted(p.name for p in site.iterdir())}}
    print(json.dumps(report, indent=1), flush=True)

    big = work / "big"
    syn = synthesise(site, big, args.units, args.workers)
    jobs = syn.pop("jobs")
    syn["site_bytes"] = du(big)
    syn["files"] = sum(1 for _ in big.rglob("*") if _.is_file())
    report["large_site"] = syn
    print(json.dumps(syn, indent=1), flush=True)
    report["browser"] = time_pages(big, jobs, args.samples, seed=0)
    print(json.dumps(report["browser"], indent=1), flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
