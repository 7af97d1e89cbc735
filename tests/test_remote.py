"""Outputs on an fsspec URL: stage folders pushed manifest-last and pulled back into a local mirror,
so that a rerun on a fresh machine recomputes nothing; clear errors for URLs that cannot work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from autoexplain import remote
from autoexplain.counters import since, snapshot
from autoexplain.errors import UserError
from autoexplain.storage import is_complete, open_root, read_manifest, write_json
from autoexplain.store import Stage


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """The mirrors go under this test's folder."""
    monkeypatch.setenv("AUTOEXPLAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(params=["file", "memory"])
def url(request, tmp_path):
    # the memory filesystem is one per process: a fresh bucket per test
    return f"file://{tmp_path}/remote" if request.param == "file" else f"memory://test-{uuid.uuid4().hex[:8]}/run"


def _stage(root: Path, key: str = "k1") -> Path:
    stage = Stage(root, "scores", key)
    table = write_json({"rows": [1, 2, 3]}, stage.path("table.json"))
    write_json({"nested": True}, table.parent / "plots" / "one.json")  # a file the manifest does not list
    return stage.seal({"simulations": "s"}, {"layer": 1})


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_round_trip_through_the_url(url, cache):
    root = open_root(url)
    assert cache in root.parents, "a URL root is worked on in a mirror under AUTOEXPLAIN_CACHE"
    written = _files(_stage(root))
    fs, base = remote.filesystem(url)
    assert sorted(fs.find(f"{base}/scores/k1")) == sorted(f"{base}/scores/k1/{name}" for name in written)
    assert remote.uri(root / "scores" / "k1") == f"{url}/scores/k1"
    here = remote.local_path(f"{url}/site/layer_1/index.html")  # where the run's viewer line says to serve from
    assert here == (root / "site" / "layer_1" / "index.html" if url.startswith("memory") else
                    Path(url.removeprefix("file://")) / "site" / "layer_1" / "index.html")

    shutil.rmtree(root)  # a fresh machine: nothing local
    stage = Stage(open_root(url), "scores", "k1")
    pulled = stage.directory
    assert stage.done and is_complete(pulled) and _files(pulled) == written
    assert read_manifest(pulled)["params"] == {"layer": 1}


def test_manifest_is_uploaded_last(tmp_path):
    url = f"file://{tmp_path}/remote"
    _stage(open_root(url))
    remote_dir = tmp_path / "remote" / "scores" / "k1"
    last = max(p.stat().st_mtime_ns for p in remote_dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert (remote_dir / "manifest.json").stat().st_mtime_ns >= last
    assert not [p for p in remote_dir.rglob(".*")], "no temporary upload names are left behind"


def test_an_incomplete_remote_folder_is_not_pulled(url):
    root = open_root(url)
    fs, base = remote.filesystem(url)
    # what an upload interrupted before its manifest leaves: data, plus a half-written temporary file
    fs.makedirs(f"{base}/scores/k2", exist_ok=True)
    fs.pipe_file(f"{base}/scores/k2/table.json", b"{}")
    fs.pipe_file(f"{base}/scores/k2/.table.json.1234.part", b"{")
    stage = Stage(root, "scores", "k2")
    directory = stage.directory
    assert not stage.done and not directory.exists(), "the stage must compute, not pull"
    with pytest.raises(UserError, match="not a finished stage output"):
        remote.fetch(f"{url}/scores/k2")

    fs.pipe_file(f"{base}/scores/k2/manifest.json", b'{"stage": "scores", "key": "k2"}')
    assert Stage(root, "scores", "k2").done
    assert is_complete(directory) and sorted(_files(directory)) == ["manifest.json", "table.json"]


def test_local_roots_are_untouched(tmp_path, cache):
    root = open_root(str(tmp_path / "out"))
    assert root == tmp_path / "out"
    directory = _stage(root)
    assert remote.uri(directory) == directory.resolve().as_uri()
    assert not cache.exists(), "a local root has no mirror"


def test_bad_urls_say_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match=r"unknown storage protocol 'nosuch://'.*a URL fsspec knows"):
        open_root("nosuch://bucket/run")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match=r"cannot reach file://.*/a-file/out: NotADirectoryError.*check the URL"):
        open_root(f"file://{tmp_path}/a-file/out")


def test_missing_backend_names_the_package():
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"s3:// outputs need the package 's3fs'.*pip install s3fs"):
            open_root("s3://bucket/run")
    else:
        pytest.skip("s3fs is installed here")


def test_cli_takes_a_url_and_a_results_location():
    shown = subprocess.run([sys.executable, "-m", "autoexplain.flows.cli", "explain-layer", "--help"],
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "fsspec URL" in shown.stdout and "--results" in shown.stdout


# ---------------------------------------------------------------- the flow, end to end

TASKS = ("record", "explain", "simulate", "score")


@pytest.fixture
def run(prefect_results, tiny_llama_dir, prose_corpus, tmp_path):
    from autoexplain.flows.explain_layer import explain_layer

    base = dict(layer=1, units="0-5", model=tiny_llama_dir, corpus=str(prose_corpus), tokens=100_000,
                explainer=f"local:{tiny_llama_dir}", simulator="embedding", k=2, shard_size=4, n_boot=50,
                out=f"file://{tmp_path}/remote", window_len=8, top_k=8, n_random=6)

    def go(**overrides):
        before = snapshot()
        state = explain_layer(**{**base, **overrides}, return_state=True)
        result = state.result()
        return result, since(before), _task_states(state.state_details.flow_run_id)

    return go


def _task_states(flow_run_id) -> dict[str, set[str]]:
    """The final state names of a flow run's tasks, by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, set[str]] = {}
    for r in runs:
        states.setdefault(r.name.rsplit("-", 1)[0], set()).add(r.state_name)
    return states


def test_a_fresh_machine_pulls_everything_from_the_url(run, tmp_path, cache, tiny_llama_dir):
    from autoexplain.tasks import stages

    url, results = f"file://{tmp_path}/remote", f"memory://results-{uuid.uuid4().hex[:8]}/prefect"
    first, counts, _ = run(results=results)
    assert counts["subject_forward"] > 0 and counts["llm_requests"] > 0 and counts["simulate"] > 0
    assert first["records"]["uri"] == f"{url}/records/{first['records']['key']}"
    assert all(s["uri"].startswith(f"{url}/scores/") and cache in Path(s["path"]).parents for s in first["scores"])
    for stage in ("windows", "records", "explanations", "simulations", "scores"):
        assert all((d / "manifest.json").is_file() for d in (tmp_path / "remote" / stage).iterdir()), stage
    assert (tmp_path / "remote" / "site" / "layer_1" / "index.html").is_file()
    fs, base = remote.filesystem(results)
    assert fs.find(base), "the task results went to the results URL"

    # A fresh machine: no mirror, no Prefect results and no model loaded, so every task runs, and
    # each one finds its output at the URL (neither the subject nor the explainer's model is loaded:
    # `model_loads` stays 0).
    shutil.rmtree(cache / "mirror")
    stages._subject.cache_clear()
    stages.llm_for.cache_clear()
    again, counts, states = run(results=f"file://{tmp_path}/results-fresh")
    assert counts == {}, f"a rerun from the URL recomputed {counts}"
    assert all(states[t] == {"Completed"} for t in TASKS), states
    assert sorted(s["key"] for s in again["scores"]) == sorted(s["key"] for s in first["scores"])
    assert all(Path(s["path"]).is_file() for s in again["scores"])
    assert any((tmp_path / "results-fresh").iterdir()), "a file:// results URL is a folder"

    # A machine that keeps the same model in a folder of another name: the keys name the model's
    # content, not where it lies, so it too finds every output at the URL.
    elsewhere = shutil.copytree(tiny_llama_dir, tmp_path / "elsewhere" / "llama-copy")
    shutil.rmtree(cache / "mirror")
    stages._subject.cache_clear()
    moved, counts, _ = run(model=str(elsewhere), explainer=f"local:{elsewhere}", results=f"file://{tmp_path}/results-moved")
    assert counts == {}, f"the model at another path recomputed {counts}"
    assert sorted(s["key"] for s in moved["scores"]) == sorted(s["key"] for s in first["scores"])

    # No mirror, but the results at the URL: the tasks are cached, and the report and the viewer
    # pull the folders that the cached references name.
    shutil.rmtree(cache / "mirror")
    cached, counts, states = run(results=results)
    assert counts == {}, f"a cached rerun recomputed {counts}"
    assert all(states[t] == {"Cached"} for t in TASKS), states
    assert cached["report"]["units"] == first["report"]["units"] > 0


def test_bad_locations_fail_with_one_clear_error(run):
    with pytest.raises(UserError, match="unknown storage protocol 'nosuch://'"):
        run(out="nosuch://bucket/run")
    with pytest.raises(UserError, match="unknown storage protocol 'nosuch://'"):
        run(results="nosuch://bucket/results")


def test_rescore_finds_the_run_at_the_url_from_a_fresh_machine(run, tmp_path, cache):
    """The nightly job on a URL root: the run's pointer and outputs come from the URL, with no mirror."""
    from autoexplain.flows.explain_layer import rescore

    url = f"file://{tmp_path}/remote"
    first, _, _ = run()
    assert (tmp_path / "remote" / "runs" / "layer_1.json").is_file(), "the pointer is pushed to the URL"
    shutil.rmtree(cache / "mirror")
    result = rescore(out=url, layer=1, simulator="embedding", n_boot=20)
    assert [s["key"] for s in result["previous_scores"]] == [s["key"] for s in first["scores"]]
    assert all(s["uri"].startswith(f"{url}/scores/") for s in result["scores"])
    assert result["comparison"]["paired"] > 0
    pointer = json.loads((tmp_path / "remote" / "runs" / "layer_1.json").read_text())
    assert pointer["flow"] == "rescore" and pointer["params"]["n_boot"] == 20


# ---------------------------------------------------------------- the URL holds what a run names

def test_a_stage_reused_from_the_mirror_is_pushed_when_the_url_lacks_it(url):
    root = open_root(url)
    written = _files(_stage(root))
    fs, base = remote.filesystem(url)
    fs.rm(f"{base}/scores/k1", recursive=True)  # a push that failed, or a URL emptied since
    assert Stage(root, "scores", "k1").done
    fs.invalidate_cache()
    assert sorted(fs.find(f"{base}/scores/k1")) == sorted(f"{base}/scores/k1/{name}" for name in written)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_stage_reused_from_the_mirror_is_pushed_again_when_its_copy_at_the_url_differs(url, damage):
    root = open_root(url)
    written = _files(_stage(root))
    fs, base = remote.filesystem(url)
    if damage == "deleted":  # the manifest is there, a file it comes with is not
        fs.rm_file(f"{base}/scores/k1/plots/one.json")
    else:
        fs.pipe_file(f"{base}/scores/k1/table.json", b"{")
    assert Stage(root, "scores", "k1").done
    fs.invalidate_cache()
    assert {name: fs.cat_file(f"{base}/scores/k1/{name}") for name in written} == written


def test_a_replaced_folder_at_the_url_holds_only_the_new_copy(url):
    root = open_root(url)
    _stage(root)  # table.json, plots/one.json and the manifest
    fs, base = remote.filesystem(url)
    fs.pipe_file(f"{base}/scores/k1/table.json", b"{")  # damaged at the URL
    shutil.rmtree(root)  # a fresh machine
    stage = Stage(open_root(url), "scores", "k1")
    assert not stage.done
    write_json({"rows": [1, 2, 3]}, stage.path("table.json"))  # the new copy has no plots/one.json
    made = stage.seal({"simulations": "s"}, {"layer": 1})
    fs.invalidate_cache()
    assert sorted(fs.find(f"{base}/scores/k1")) == [f"{base}/scores/k1/manifest.json", f"{base}/scores/k1/table.json"]
    assert fs.cat_file(f"{base}/scores/k1/manifest.json") == (made / "manifest.json").read_bytes()


def _named_folders(pointer: dict) -> set[str]:
    """The stage folders (`<stage>/<key>`) a run pointer names, relative to the root."""
    found = set()
    for value in pointer.values():
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, dict) and "path" in ref:
                found |= {"/".join(Path(ref[k]).parts[:2]) for k in ("path", "windows") if k in ref}
    return found


def _url_has_what_the_run_names(remote_dir: Path) -> None:
    named = _named_folders(json.loads((remote_dir / "runs" / "layer_1.json").read_text()))
    assert {"windows", "records", "explanations", "simulations", "scores"} <= {n.split("/")[0] for n in named}
    missing = sorted(n for n in named if not (remote_dir / n / "manifest.json").is_file())
    assert not missing, f"the run names folders the URL lacks: {missing}"


def test_a_run_that_ends_well_leaves_at_the_url_all_it_names(run, tmp_path):
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    (remote_dir / "explanations").write_text("")  # the explanations' push fails
    with pytest.raises(UserError, match="cannot reach"):
        run()
    (remote_dir / "explanations").unlink()
    run()
    _url_has_what_the_run_names(remote_dir)

    for p in remote_dir.iterdir():  # the URL emptied, the mirror kept
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    run()
    _url_has_what_the_run_names(remote_dir)


def test_a_damaged_folder_at_the_url_is_replaced_by_the_one_made_again(url):
    root = open_root(url)
    _stage(root)
    fs, base = remote.filesystem(url)
    fs.pipe_file(f"{base}/scores/k1/table.json", b"{")  # truncated at the URL
    shutil.rmtree(root)  # a fresh machine
    stage = Stage(open_root(url), "scores", "k1")
    assert not stage.done, "a damaged folder is made again, not read"
    write_json({"rows": [1, 2, 3]}, stage.path("table.json"))
    made = stage.seal({"simulations": "s"}, {"layer": 1})
    fs.invalidate_cache()
    assert fs.cat_file(f"{base}/scores/k1/table.json") == (made / "table.json").read_bytes()
    shutil.rmtree(root)
    assert Stage(open_root(url), "scores", "k1").done, "the URL holds a whole folder again"


def test_a_damaged_output_at_the_url_is_repaired_by_a_fresh_machine(run, tmp_path, cache):
    from autoexplain.storage import damaged

    first, _, _ = run()
    scores = tmp_path / "remote" / "scores" / first["scores"][0]["key"]
    table = next(scores.glob("*.parquet"))
    table.write_bytes(table.read_bytes()[:100])
    shutil.rmtree(cache / "mirror")  # a fresh machine: no mirror, no task results
    run(results=f"file://{tmp_path}/results-fresh")
    assert damaged(scores) is None, "the copy made again replaced the damaged one at the URL"


def test_a_fresh_machine_lists_and_publishes_the_runs_at_the_url(run, tmp_path, cache):
    from autoexplain import run_lookup
    from autoexplain.publish import publish
    from autoexplain.storage import run_sources

    url = f"file://{tmp_path}/remote"
    run()
    shutil.rmtree(cache / "mirror")  # no run pointer on this machine
    assert run_sources(open_root(url)) == [(1, "mlp")]
    shutil.rmtree(cache / "mirror")
    with pytest.raises(UserError, match=r"no finished explain-layer run of layer 2 \(it has layers 1\)"):
        run_lookup.find_run(url, 2)
    shutil.rmtree(cache / "mirror")
    dataset = publish(url, tmp_path / "dataset", license_="cc-by-4.0")
    assert (dataset / "README.md").is_file() and any((dataset / "data").rglob("*.parquet"))

    # to a URL, from the command line: the same dataset there; an earlier one is replaced whole
    published = tmp_path / "published"
    for _ in range(2):
        shown = _cli("publish", "--out", url, "--to", f"file://{published}", "--license", "cc-by-4.0", cache=cache)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip() == f"file://{published}"
        here, there = _files(dataset), _files(published)  # the same files (a .gz header holds its time)
        assert sorted(there) == sorted(here) and there["README.md"] == here["README.md"]
        (published / "data" / "stale.parquet").write_bytes(b"from an earlier publish")
    (published / "README.md").unlink()  # a folder that publish did not write: refused, left as it is
    before = _files(published)
    shown = _cli("publish", "--out", url, "--to", f"file://{published}", "--license", "cc-by-4.0", cache=cache)
    assert shown.returncode == 2 and "Traceback" not in shown.stderr, shown.stderr
    assert shown.stderr.strip().splitlines() == [f"error: file://{published} is not empty and holds no dataset that "
                                                 "publish wrote — choose an empty or new folder"]
    assert _files(published) == before


def test_view_builds_a_site_from_urls(run, tmp_path, cache):
    first, _, _ = run()
    scores = [s["uri"] for s in first["scores"]]  # file:// URLs of the run's scores folders
    shutil.rmtree(cache / "mirror")
    shown = _cli("view", *[a for s in scores for a in ("--scores", s)], "--site", f"file://{tmp_path}/site-a", cache=cache)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == str(tmp_path / "site-a" / "index.html") and (tmp_path / "site-a" / "index.html").is_file()

    # the same root named by another URL (local://, worked through a mirror as s3:// would be): the scores
    # folders are pulled with what the viewer follows them to, and the site is uploaded
    shown = _cli("view", *[a for s in scores for a in ("--scores", s.replace("file://", "local://"))],
                 "--site", f"local://{tmp_path}/site-b", cache=cache)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"local://{tmp_path}/site-b/index.html"
    assert sorted(p.name for p in (tmp_path / "site-b").iterdir()) == sorted(p.name for p in (tmp_path / "site-a").iterdir())
    mirrored = {p.parent.parent.name for p in (cache / "mirror").glob("*/*/*/manifest.json")}
    assert {"scores", "simulations", "records", "windows"} <= mirrored, mirrored

    # rebuilt from one shard: the unit files of the other shard's units go at the URL too
    def data(site):
        return sorted(p.relative_to(site).as_posix() for p in (site / "data").rglob("*") if p.is_file())

    before = data(tmp_path / "site-b")
    for site in (f"local://{tmp_path}/site-b", str(tmp_path / "site-c")):
        assert _cli("view", "--scores", scores[0].replace("file://", "local://"), "--site", site, cache=cache).returncode == 0
    assert data(tmp_path / "site-b") == data(tmp_path / "site-c") and len(before) > len(data(tmp_path / "site-c"))

    shown = _cli("view", "--serve", "--site", f"local://{tmp_path}/site-b", "--port", "0", cache=cache)
    assert shown.returncode == 2 and shown.stderr.strip().splitlines() == [
        f"error: --site local://{tmp_path}/site-b: --serve serves a folder on this machine, and this site is at a URL "
        "— copy the site into a folder here and pass that folder, or add --scores to build it here"]


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoexplain.flows.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "AUTOEXPLAIN_CACHE": str(cache), "COLUMNS": "400"}, timeout=300)


def test_file_systems_that_fail_when_made_say_what_is_wrong(tmp_path, cache):
    with pytest.raises(UserError, match=r"cannot reach ftp://127.0.0.1:1/x: ConnectionRefusedError.*check the URL"):
        open_root("ftp://127.0.0.1:1/x")
    with pytest.raises(UserError, match=r"cannot reach zip://x::file://.*: FileNotFoundError"):
        open_root(f"zip://x::file://{tmp_path}/none.zip")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"http:// outputs need the package 'aiohttp'.*pip install aiohttp"):
            open_root("http://127.0.0.1:1/x")
    shown = _cli("explain-layer", "--out", "ftp://127.0.0.1:1/x", "--layer", "1", cache=cache)
    assert shown.returncode == 2 and "Traceback" not in shown.stderr, shown.stderr
    assert shown.stderr.strip().splitlines() == ["error: --out: cannot reach ftp://127.0.0.1:1/x: ConnectionRefusedError: "
                                                 "[Errno 111] Connection refused — check the URL, the credentials "
                                                 "and that the location exists and is writable"]


@pytest.mark.parametrize("command", [["explain-layer", "--layer", "1", "--out", "memory://run/out"],
                                     ["explain-layer", "--layer", "1", "--results", "memory://run/results"],
                                     ["publish", "--out", "memory://run/out", "--to", "dataset"]])
def test_the_cli_refuses_a_url_that_vanishes_when_it_exits(command, tmp_path, cache):
    """memory:// lives in one process (the tests above use it so); a command's output there is lost."""
    flag, url = next((a, b) for a, b in zip(command, command[1:]) if b.startswith("memory://"))
    shown = _cli(*[str(tmp_path / a) if a == "dataset" else a for a in command], cache=cache)
    assert shown.returncode == 2 and "Traceback" not in shown.stderr, shown.stderr
    assert shown.stderr.strip().splitlines() == [f"error: {flag}: {url} lives in this process's memory: what is written "
                                                 "there vanishes when the command exits — pass a folder or a persistent "
                                                 "URL (file:///path, s3://bucket/run, ...)"]
    assert not (cache / "mirror").exists() and not (tmp_path / "dataset").exists()


@pytest.mark.parametrize("command", [["rescore", "--layer", "1"], ["revise", "--layer", "1", "--unit", "1", "--text", "x"],
                                     ["publish", "--to", "dataset"]])
def test_read_only_commands_make_nothing_for_a_mistyped_url(command, tmp_path, cache):
    url = f"file://{tmp_path}/typo/out"
    shown = _cli(*command[:1], "--out", url, *[str(tmp_path / a) if a == "dataset" else a for a in command[1:]],
                 cache=cache)
    assert shown.returncode == 2, shown.stderr
    assert f"--out: {url} does not exist" in shown.stderr and "Traceback" not in shown.stderr
    assert not (tmp_path / "typo").exists() and not (cache / "mirror").exists() and not (tmp_path / "dataset").exists()
