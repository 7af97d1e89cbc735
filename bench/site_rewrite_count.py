"""How many unit files a site rebuild after a rerun writes, recomputed from a run's outputs without
building the site: units whose own details or simulations changed (`scores_of`, `explanations_of`,
`sims_digests`) or whose similar-units list changed (`write_meaning` on both runs, each with a copy
of the text-vector cache). With `--old-meaning`, also for another version of `view_meaning.py`.

The two runs' scores folders are told apart by when their manifests were written (UTC, HH:MM):

    git show 2da1474:autoexplain/view_meaning.py > /tmp/old_meaning.py
    python bench/site_rewrite_count.py --out OUT --full 22:20 23:09 --rerun 23:26 23:35 --old-meaning /tmp/old_meaning.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

from autoexplain.view_data import (PRIMARY_METRIC, explanations_of, index_frame, scores_of, sims_digests, unit_list,
                                   unit_page)
from autoexplain.view_sources import find_sources, read_chosen, read_scores, sims_frame


def scores_between(out: Path, first: str, last: str) -> list[Path]:
    def written(d: Path) -> str:
        return dt.datetime.fromtimestamp((d / "manifest.json").stat().st_mtime, dt.timezone.utc).strftime("%H:%M")
    return [d for d in sorted((out / "scores").iterdir()) if first <= written(d) <= last]


def units_of(dirs: list[Path]):
    """Each unit page's own part (scores, explanations, simulations digest), and the meaning groups."""
    own, groups = {}, []
    for src in find_sources(dirs):
        scores, chosen = read_scores(src), read_chosen(src)
        units = unit_list(scores, chosen)
        polar = bool((units["polarity"] < 0).any())
        index = index_frame(units, scores, chosen)
        sc, ex, sd = scores_of(scores), explanations_of(chosen), sims_digests(sims_frame(src))
        for u, p in units.select("unit", "polarity").iter_rows():
            own[unit_page(src.source, u, p, polar)] = (sc.get((u, p)), ex.get((u, p)), sd.get((u, p)))
        pages = [unit_page(src.source, u, p, polar) for u, p in index.select("unit", "polarity").iter_rows()]
        groups.append((src.source, pages, index["text"].to_list(), index[f"{PRIMARY_METRIC}:v"].to_list()))
    return own, groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--full", nargs=2, required=True, metavar=("FROM", "TO"))
    ap.add_argument("--rerun", nargs=2, required=True, metavar=("FROM", "TO"))
    ap.add_argument("--old-meaning", help="another view_meaning.py to count with too")
    args = ap.parse_args()
    runs = {"full": units_of(scores_between(args.out, *args.full)), "rerun": units_of(scores_between(args.out, *args.rerun))}
    pages = list(runs["full"][0])
    own = {p for p in pages if runs["full"][0][p] != runs["rerun"][0].get(p)}
    print(f"units {len(pages)}, own details or simulations changed {len(own)}")
    vectors = sorted((args.out / "memo" / "view").glob("text-vectors-*.parquet"))
    versions = [("this checkout", str(Path(__file__).resolve().parent.parent / "autoexplain" / "view_meaning.py"))]
    versions += [("old", args.old_meaning)] if args.old_meaning else []
    for label, path in versions:
        spec = importlib.util.spec_from_file_location(f"meaning_{len(label)}", path)
        meaning = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(meaning)
        similar = {}
        for run, (_, groups) in runs.items():
            with tempfile.TemporaryDirectory() as tmp:
                cache = Path(tmp, "cache")
                cache.mkdir()
                for v in vectors:
                    shutil.copy(v, cache / v.name)
                started = time.perf_counter()
                similar[run] = meaning.write_meaning(Path(tmp, "site"), groups, cache)
                print(f"{label}: write_meaning of the {run} run {time.perf_counter() - started:.1f}s", flush=True)
        moved = {p for p in pages if similar["full"].get(p) != similar["rerun"].get(p)}
        print(f"{label}: similar lists changed {len(moved)}, unit files to write {len(moved | own)}", flush=True)


if __name__ == "__main__":
    main()
