"""An output root moved or copied whole keeps working: every command reads it where it is now.

A real run is made into one root from the command line, then moved (`shutil.move`) or copied
(`shutil.copytree`, what `cp -r` does) to another; the old one is deleted, and every consumer
(view, publish, rescore, revise, import, explain-layer again) works from the new place, reusing
every finished stage. A copy is independent of its original: writing in one never touches the other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from autoexplain.storage import read_run, write_run
from tests.test_cli_runs import cli

pytestmark = pytest.mark.slow
RUN = ["explain-layer", "--layer", "1", "--units", "0-3", "--tokens", "20000", "--k", "1", "--shard-size", "2",
       "--bootstrap", "50", "--window-len", "8", "--top-k", "8", "--random", "6"]
TEXT = (".json", ".js", ".md", ".html")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def args(tiny_llama_dir, prose_corpus):
    return [*RUN, "--model", tiny_llama_dir, "--corpus", str(prose_corpus)]


@pytest.fixture(scope="module")
def moved(home, args, tmp_path_factory):
    """A run made into A, then moved to B: (A, B, each stage output's manifest mtime in A by its path in the root)."""
    base = tmp_path_factory.mktemp("relocate")
    a, b = base / "A", base / "B"
    made = cli(home, *args, "--out", str(a))
    assert made.returncode == 0, made.stderr[-4000:]
    sealed = _sealed(a)
    shutil.move(a, b)
    assert not a.exists()
    return a, b, sealed


def _sealed(root: Path) -> dict[str, int]:
    return {str(m.parent.relative_to(root)): m.stat().st_mtime_ns for m in root.glob("*/*/manifest.json")}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _mentions(root: Path, old: Path) -> list[str]:
    """Files under `root` that name `old`: text files, and string cells of the caches' tables."""
    found = [str(p) for p in root.rglob("*") if p.suffix in TEXT and str(old) in p.read_text(errors="replace")]
    for p in (root / "memo").rglob("*.parquet"):
        df = pl.read_parquet(p)
        if any(str(old) in str(v) for c in df.columns if df[c].dtype == pl.Utf8 for v in df[c].to_list()):
            found.append(str(p))
    return found


def _scores_dirs(root: Path) -> list[str]:
    return [str(Path(r["path"]).parent) for r in read_run(root, 1)["scores"]]


def _outside(root: Path) -> list[str]:
    """The paths of the run's pointer under `root` that are not inside it."""
    run = read_run(root, 1)
    paths = [run["records"]["path"], run["records"]["windows"], run["site_dir"]]
    paths += [r["path"] for stage in ("explanations", "simulations", "scores") for r in run[stage]]
    return [p for p in paths if p is not None and root not in Path(p).parents]


def test_a_moved_root_works_from_its_new_place(home, args, moved, tmp_path):
    a, b, sealed = moved
    site = tmp_path / "site"
    scores = [x for d in sorted((b / "scores").iterdir()) for x in ("--scores", str(d))]
    shown = cli(home, "view", *scores, "--site", str(site))
    assert shown.returncode == 0 and (site / "index.html").is_file(), shown.stderr[-4000:]

    published = cli(home, "publish", "--out", str(b), "--to", str(tmp_path / "dataset"), "--license", "other")
    assert published.returncode == 0, published.stderr[-4000:]
    assert pl.read_parquet(tmp_path / "dataset" / "data" / "scores" / "mlp" / "layer_1.parquet").height > 0

    rescored = cli(home, "rescore", "--out", str(b), "--layer", "1", "--bootstrap", "50")
    assert rescored.returncode == 0, rescored.stderr[-4000:]
    assert "mean change" in rescored.stderr and str(a) not in rescored.stderr
    assert _outside(b) == []

    again = cli(home, *args, "--out", str(b))
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"outputs: {b}" in again.stderr and str(a) not in again.stderr
    assert _sealed(b) == sealed, "every stage output was reused as it was: none made again, none added"
    assert not list((b / "memo").rglob("*.log")), "no unit was computed again"
    assert not a.exists() and _mentions(b, a) == []


def test_a_copied_root_is_independent_of_its_original(home, args, moved, tmp_path):
    a, b, _ = moved
    c, d = tmp_path / "C", tmp_path / "D"
    shutil.copytree(b, c)
    made = cli(home, *args, "--out", str(c))  # C's pointer now names C's own outputs, as a run there writes it
    assert made.returncode == 0, made.stderr[-4000:]
    shutil.copytree(c, d)  # what `cp -r C D` does
    before = _tree(c)
    rescored = cli(home, "rescore", "--out", str(d), "--layer", "1", "--bootstrap", "50")
    assert rescored.returncode == 0, rescored.stderr[-4000:]
    revised = cli(home, "revise", "--out", str(d), "--layer", "1", "--unit", "2:-1", "--text", "years written in digits")
    assert revised.returncode == 0, revised.stderr[-4000:]
    assert _tree(c) == before, "writing in the copy touched the original"
    shutil.rmtree(c)

    explained = pl.concat([pl.read_parquet(r["path"]) for r in read_run(d, 1)["explanations"]])
    assert "years written in digits" in explained["text"].to_list()
    assert _outside(d) == []
    published = cli(home, "publish", "--out", str(d), "--to", str(tmp_path / "dataset"), "--license", "other")
    assert published.returncode == 0, published.stderr[-4000:]
    assert [_mentions(d, x) for x in (a, b, c)] == [[], [], []]


def test_an_imported_root_moves_too(home, moved, tmp_path):
    _, b, _ = moved
    assert cli(home, "publish", "--out", str(b), "--to", str(tmp_path / "dataset"), "--license", "other").returncode == 0
    e, f = tmp_path / "E", tmp_path / "F"
    imported = cli(home, "import", "--from", str(tmp_path / "dataset"), "--out", str(e))
    assert imported.returncode == 0, imported.stderr[-4000:]
    shutil.move(e, f)
    rescored = cli(home, "rescore", "--out", str(f), "--layer", "1", "--bootstrap", "50")
    assert rescored.returncode == 0, rescored.stderr[-4000:]
    assert _outside(f) == [] and _mentions(f, e) == []


def test_a_cached_reference_to_the_old_place_is_made_again_not_a_crash(moved):
    """Prefect's task cache may still hold the references a task returned for the root's old place:
    one that names a folder no longer there is no cache hit (the task runs, and its stage finds its
    sealed output where the root is now), and read as an input it is one line."""
    from autoexplain.errors import UserError
    from autoexplain.storage import local_ref
    from autoexplain.tasks.caching import output_is_whole

    a, b, _ = moved
    run = read_run(b, 1)
    for ref in [run["records"], *run["explanations"], *run["scores"]]:
        there = {k: v.replace(b.as_uri(), a.as_uri()).replace(str(b), str(a)) if k in ("path", "uri", "windows") else v
                 for k, v in ref.items()}
        assert output_is_whole(ref) and not output_is_whole(there)
        with pytest.raises(UserError, match="does not exist"):
            local_ref(there)


def test_a_tasks_cache_key_takes_an_input_by_its_uri_not_by_this_machines_copy():
    """Under a URL root each machine keeps its outputs in its own mirror folder: two machines (or
    users) sharing Prefect's results (`--results URL`) give a task the same key for the same input."""
    from autoexplain.layer import run_explain
    from autoexplain.tasks.caching import cache_key

    key = cache_key("explain", (run_explain,))

    def records(url: str, home: str) -> dict:
        mirror = f"{home}/.cache/autoexplain/mirror/0123456789abcdef"
        return {"uri": f"{url}/records/abc", "path": f"{mirror}/records/abc", "key": "abc", "layers": [1],
                "windows": f"{mirror}/windows/def/windows.parquet", "n_units": 8, "source": "mlp", "window_len": 8}

    def explain(url: str, home: str) -> str:
        return key(None, {"records": records(url, home), "layer": 1, "units": [0, 1], "explainer": "embedding",
                          "k": 1, "out": url})

    assert explain("s3://b/run", "/home/me") == explain("s3://b/run", "/home/you") != explain("s3://b/other", "/home/me")


def test_a_model_gone_since_the_run_is_one_line(home, moved, tmp_path):
    """Things outside the root (the model, the corpus) stay where the run found them: one that is gone
    after the root moved to another machine is named in one line, not a traceback; revise, which
    records and explains nothing, does not need it."""
    _, b, _ = moved
    g = tmp_path / "G"
    shutil.copytree(b, g)
    run = read_run(g, 1)
    gone = str(tmp_path / "no-such-model")
    write_run(g, 1, {**run, "params": {**run["params"], "model": gone}})
    revised = cli(home, "revise", "--out", str(g), "--layer", "1", "--unit", "2:-1", "--text", "years")
    assert revised.returncode == 0, revised.stderr[-3000:]
    result = cli(home, "explain-layer", "--out", str(g), "--layer", "1", "--model", gone, "--corpus", run["params"]["corpus"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no-such-model" in result.stderr and "does not exist" in result.stderr


def test_a_root_written_with_absolute_paths_is_still_read(moved, tmp_path):
    """Roots written before pointers held paths relative to the root: an absolute path is read
    where it exists, and a root since moved finds its own folders by their stage and key."""
    _, b, _ = moved
    old = tmp_path / "old"
    shutil.copytree(b, old)
    pointer = old / "runs" / "layer_1.json"
    run = json.loads(pointer.read_text())
    for ref in run["scores"]:  # as the code before wrote them
        folder = old / "scores" / ref["key"]
        ref.update(path=str(folder / "layer_1.parquet"), uri=folder.as_uri())
    pointer.write_text(json.dumps(run))
    assert sorted(_scores_dirs(old)) == sorted(str(old / "scores" / r["key"]) for r in run["scores"])
    new = tmp_path / "new"
    shutil.move(old, new)
    assert sorted(_scores_dirs(new)) == sorted(str(new / "scores" / r["key"]) for r in run["scores"])
    assert all(Path(d).is_dir() for d in _scores_dirs(new))
