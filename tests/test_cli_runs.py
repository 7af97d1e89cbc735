"""What users run end to end from the command line: explain-layer, then rescore and revise of that
run by its output root and layer; and every bad flag of those, caught before any work with one line.

Each command runs as a real process with Prefect's ephemeral server in its own PREFECT_HOME.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from autoexplain.storage import read_run
from tests.test_cli import _one_error_line
from tests.prefect_homes import command_env, prefect_home

pytestmark = pytest.mark.slow
EXE = [sys.executable, "-m", "autoexplain.flows.cli"]  # the console script's module


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-home")


def cli(home: Path, *args: str, cwd: Path | None = None, temporary: bool = False) -> subprocess.CompletedProcess:
    """`temporary`: the command starts Prefect's temporary server (else it reports to the test
    process's server, `prefect_homes.command_env`)."""
    return subprocess.run([*EXE, *args], capture_output=True, text=True, env=command_env(home, temporary), cwd=cwd)


@pytest.fixture(scope="module")
def explained(home, tiny_llama_dir, prose_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-run") / "out"
    # no --layer: the model's middle layer, 1 of its 0-2 (15, SmolLM2's, would be out of range)
    result = cli(home, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus),
                 "--units", "0-3", "--tokens", "20000", "--k", "1", "--shard-size", "2", "--bootstrap", "50",
                 "--window-len", "8", "--top-k", "8", "--random", "6", "--out", str(out), temporary=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def _table(out: Path, stage: str, layer: int = 1) -> pl.DataFrame:
    run = read_run(out, layer)
    return pl.concat([pl.read_parquet(r["path"]) for r in run[stage]])


def test_explain_layer_ends_with_one_summary_and_the_paths(explained):
    out, result = explained
    err = result.stderr
    assert err.count("test-split scores") == 1, "one table for the layer, not one per shard"
    assert "layer 1: test-split scores of 8 units" in err and "beats token-lookup" in err
    viewer = next(line for line in err.splitlines() if line.startswith("viewer: "))
    index = Path(viewer.removeprefix("viewer: ").split()[0])
    assert index.name == "index.html" and index.is_file() and "view --serve" in viewer
    assert f"outputs: {out.resolve()}" in err and result.stdout.strip() == str(out.resolve())
    assert "Traceback" not in err and err.count("of the 20,000 asked: using them all") == 1  # in the Prefect log


@pytest.mark.slow
def test_the_run_s_view_at_link_opens_in_a_later_prefect_server(home, explained):
    """The temporary server is gone when the command ends; its "View at" link names where a later
    `prefect server start` on the same home serves the UI (Prefect's default port), and the run is there."""
    import re
    import time

    import httpx
    from tests.llama_server import free_port

    _, result = explained
    link = re.search(r"View at (\S+)", result.stderr).group(1)
    run_id = link.rsplit("/", 1)[1]
    assert link == f"http://127.0.0.1:4200/runs/flow-run/{run_id}", link
    assert f"Prefect: the flow run stays in {home}; `prefect server start` shows it at the 'View at' link" in result.stderr
    port = free_port()  # 4200 itself may be taken on a test machine: the same server, another port
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=prefect_home(home), PREFECT_SERVER_API_PORT=str(port), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--no-services"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):  # until it answers
            try:
                run = httpx.get(f"{base}/api/flow_runs/{run_id}", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None, "prefect server start ended"
                time.sleep(0.2)
        assert run.status_code == 200 and run.json()["state"]["type"] == "COMPLETED", run.text[:500]
        page = httpx.get(base + link.removeprefix("http://127.0.0.1:4200"), headers={"Accept": "text/html"}, timeout=5,
                         follow_redirects=True)  # as a browser navigates: the UI's page for that path
        assert page.status_code == 200 and "<html" in page.text.lower(), (page.status_code, page.text[:300])
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_summary_in_a_log_keeps_every_name_whole(explained, monkeypatch, capsys):
    """Written to a file or a worker's log (no terminal, no COLUMNS), the layer's table is not cut
    to rich's 80 columns: every method and metric reads whole on its row."""
    from autoexplain.console import print_summary
    from autoexplain.summary import layer_summary

    out, _ = explained
    monkeypatch.delenv("COLUMNS", raising=False)
    paths = [Path(r["path"]) for r in read_run(out, 1)["scores"]]
    print_summary(paths)
    rows = capsys.readouterr().err.splitlines()
    assert "…" not in "".join(rows)
    for r in layer_summary(pl.concat([pl.read_parquet(p) for p in paths])).iter_rows(named=True):
        assert any(f" {r['method']} " in line and f" {r['metric']} " in line for line in rows), (r["method"], r["metric"])


def test_rescore_by_output_root_and_layer(home, explained, tiny_llama_dir):
    out, _ = explained
    before = _table(out, "scores")
    result = cli(home, "rescore", "--out", str(out), "--layer", "1", "--simulator", f"all-at-once:local:{tiny_llama_dir}",
                 "--bootstrap", "50")
    assert result.returncode == 0, result.stderr[-4000:]
    after = _table(out, "scores")
    assert {s.split(":")[0] for s in before["simulator"]} == {"embedding"}
    assert {s.split(":")[0] for s in after["simulator"]} == {"all-at-once"}
    assert "mean change" in result.stderr and "Units that moved most" in result.stderr
    run = read_run(out, 1)
    assert run["flow"] == "rescore" and len(run["previous_scores"]) == 2
    report = (out / "runs" / "layer_1.rescore.md").read_text()
    assert "mean change" in report and "| 1 |" in report, "the comparison is written beside the pointer"


def test_rescore_without_a_layer_takes_the_one_layer_with_a_run(home, explained):
    out, _ = explained
    result = cli(home, "rescore", "--out", str(out), "--bootstrap", "50")
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_run(out, 1)["flow"] == "rescore" and not (out / "runs" / "layer_15.json").exists()


def test_revise_changes_that_unit_and_polarity_only(home, explained):
    """On top of the run's own explanations: nothing recorded or explained again, and only the shard
    holding the revised unit (units 2-3 of 0-3 in shards of 2) simulated and scored again."""
    out, _ = explained
    before, pointer = _table(out, "explanations"), read_run(out, 1)
    folders = {stage: len(list((out / stage).iterdir())) for stage in ("records", "explanations", "simulations")}
    result = cli(home, "revise", "--out", str(out), "--layer", "1", "--unit", "2:-1", "--text", "years written in digits")
    assert result.returncode == 0, result.stderr[-4000:]
    after = _table(out, "explanations")
    key = ["unit", "polarity", "method"]
    joined = before.join(after, on=key, suffix="_new")
    changed = joined.filter(pl.col("text") != pl.col("text_new"))
    assert changed.select("unit", "polarity", "method", "text_new").rows() == [(2, -1, "explainer", "years written in digits")]
    run = read_run(out, 1)
    assert run["flow"] == "revise" and run["params"]["revisions"] == {"2:-1": "years written in digits"}
    assert {stage: len(list((out / stage).iterdir())) for stage in folders} == {**folders, "explanations": folders[
        "explanations"] + 1, "simulations": folders["simulations"] + 1}, "one shard's explanations and simulations are new"
    assert run["explanations"][0] == pointer["explanations"][0] and run["scores"][0] == pointer["scores"][0]
    assert run["previous_scores"] == pointer["scores"] and "mean change" in result.stderr
    assert "2:-1" in (out / "runs" / "layer_1.revise.md").read_text()
    again = cli(home, "revise", "--out", str(out), "--layer", "1", "--unit", "0", "--text", "the word the")
    assert again.returncode == 0, again.stderr[-4000:]
    merged = read_run(out, 1)["params"]["revisions"]
    assert merged == {"0:+1": "the word the", "2:-1": "years written in digits"}, "the earlier revision is kept"
    assert set(_table(out, "explanations").filter(pl.col("explainer") == "human")["text"]) == {"the word the",
                                                                                             "years written in digits"}


BAD_FLAGS = [
    (["--units", "5000-6000"], "--units: unit 5000 is out of range"), (["--units", "5-2"], "--units: the unit range '5-2' runs backwards"),
    (["--units", ""], "--units: '' names no unit"),  # an unset shell variable: not every unit
    (["--layer", "99"], "--layer: layer 99 is out of range"),
    (["--simulator", "nonsense"], "--simulator: unknown simulator 'nonsense'"),
    (["--simulator", "chat-json/four:local"], "--simulator: 'chat-json/four:local': records per request must be a whole"),
    (["--explainer", "openai:m@http://127.0.0.1:9/v1"], "--explainer: the LLM server at http://127.0.0.1:9/v1 is not reachable"),
    (["--k", "0"], "--k: must be at least 1"),
    (["--shard-size", "0"], "--shard-size: must be at least 1"),
    (["--bootstrap", "0"], "--bootstrap: must be at least 1"),
    (["--tokens", "0"], "--tokens: must be at least 1"),
    (["--corpus", "/no/such/corpus.txt"], "--corpus: corpus /no/such/corpus.txt does not exist"),
    (["--model", "/no/such/model"], "--model: model folder /no/such/model does not exist"),
    (["--top-k", "0"], "--top-k: must be at least 1"),
    (["--random", "-1"], "--random: must be at least 0"),
    (["--window-len", "1"], "--window-len: must be at least 2"), (["--window-len", "257"], "longer than the model's context of 256"),
    (["--concurrency", "0"], "--concurrency: must be at least 1"),
    (["--concurrency", "-2"], "--concurrency: must be at least 1, got -2"),
    (["--rpm", "0"], "--rpm: must be more than 0 requests per minute"),
    (["--tpm", "-5"], "--tpm: must be more than 0 tokens per minute"),
    (["--retries", "-1"], "--retries: must be at least 0, got -1"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_explain_layer_bad_flag_fails_before_any_work(home, tiny_llama_dir, prose_corpus, tmp_path, flags, needle):
    base = {"--model": tiny_llama_dir, "--corpus": str(prose_corpus), "--layer": "1", "--out": str(tmp_path / "out")}
    base.update(dict(zip(flags[::2], flags[1::2])))
    result = cli(home, "explain-layer", *[x for kv in base.items() for x in kv])
    line = _one_error_line(result)
    assert needle in line, line
    assert "scored" not in result.stderr and "Flow run" not in result.stderr, "no flow started, no bars"
    assert not (tmp_path / "out").exists(), "nothing written"


def test_rescore_and_revise_bad_flags(home, explained, tmp_path):
    out, _ = explained
    assert "--layer: " in _one_error_line(cli(home, "rescore", "--out", str(out), "--layer", "7"))
    assert "--out: " in _one_error_line(cli(home, "rescore", "--out", str(tmp_path / "none"), "--layer", "1"))
    assert "--simulator: unknown simulator" in _one_error_line(cli(home, "rescore", "--out", str(out), "--layer", "1",
                                                                   "--simulator", "x"))
    assert "--unit: unit 40 is not among" in _one_error_line(cli(home, "revise", "--out", str(out), "--layer", "1",
                                                                 "--unit", "40", "--text", "t"))
    assert "--unit: cannot read the revision key" in _one_error_line(cli(home, "revise", "--out", str(out), "--layer", "1",
                                                                         "--unit", "x:1", "--text", "t"))
    assert "needs --unit with --text" in _one_error_line(cli(home, "revise", "--out", str(out), "--layer", "1"))
    assert "--file " in _one_error_line(cli(home, "revise", "--out", str(out), "--layer", "1", "--file",
                                            str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert f"cannot read revisions from {bad}" in _one_error_line(cli(home, "revise", "--out", str(out), "--layer", "1",
                                                                      "--file", str(bad)))


def test_stage_commands_reject_bad_input_in_one_line(home, explained, tmp_path):
    out, _ = explained
    run = read_run(out, 1)
    x, sims = (str(Path(run[s][0]["path"]).parent) for s in ("explanations", "simulations"))
    scores = str(Path(run["scores"][0]["path"]).parent)
    missing = str(tmp_path / "missing")
    for args in (["simulate", "--records", missing, "--explanations", x],
                 ["score", "--records", missing, "--simulations", sims],
                 ["export", "--records", missing, "--scores", scores, "--to", str(tmp_path / "export")]):
        assert f"{missing} is not a finished records folder" in _one_error_line(cli(home, *args, *(
            ["--out", str(tmp_path / "o")] if args[0] != "export" else [])))
    records = run["records"]["path"]
    assert "--bootstrap: must be at least 1" in _one_error_line(cli(home, "score", "--records", records, "--simulations",
                                                                     sims, "--bootstrap", "0"))
    assert "--layers: the layer range '2-1' runs backwards" in _one_error_line(cli(home, "record", "--layers", "2-1",
                                                                         "--out", str(tmp_path / "o")))
    assert not (tmp_path / "o").exists() and not (tmp_path / "export").exists()

    # a folder of another stage where one stage's output is asked for
    for args, wrong, wanted in ((["explain", "--records", x], x, "records"),
                                (["simulate", "--records", records, "--explanations", records], records, "explanations"),
                                (["score", "--records", sims, "--simulations", sims], sims, "records"),
                                (["score", "--records", records, "--simulations", x], x, "simulations"),
                                (["export", "--records", records, "--scores", sims, "--to", str(tmp_path / "export")],
                                 sims, "scores")):
        line = _one_error_line(cli(home, *args))
        assert f"{wrong} holds " in line and f", not {wanted}" in line, (args[0], line)
    # an output path that is a file, a unit the recording lacks, a port that is no port
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for args, flag in ((["explain", "--records", records, "--out", str(a_file)], "--out"),
                       (["simulate", "--records", records, "--explanations", x, "--out", str(a_file)], "--out"),
                       (["score", "--records", records, "--simulations", sims, "--out", str(a_file)], "--out"),
                       (["export", "--records", records, "--scores", scores, "--to", str(a_file)], "--to"),
                       (["import", "--from", str(tmp_path), "--layer", "1", "--out", str(a_file)], "--out"),
                       (["view", "--scores", scores, "--site", str(a_file)], "--site")):
        assert f"{flag}: cannot write under {a_file}" in _one_error_line(cli(home, *args)), args[0]
    assert a_file.read_text() == "mine"
    assert "unit 48 is out of range: the layer has units 0..47" in _one_error_line(cli(home, "explain", "--records", records, "--units",
                                                                      "0-9999", "--out", str(tmp_path / "o")))
    assert "--port 99999 is not a port number" in _one_error_line(cli(home, "view", "--scores", scores, "--serve",
                                                                       "--port", "99999", "--site", str(tmp_path / "s")))
    assert "--host 999.1.1.1 is not an address" in _one_error_line(cli(home, "view", "--serve", "--host", "999.1.1.1",
                                                                        "--site", str(tmp_path / "s")))
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", ["explain-layer", "explain-model"])
def test_a_corpus_too_short_for_the_exemplars_is_one_line(home, tiny_llama_dir, prose_corpus, tmp_path, command):
    """Found only when the recording task reads the corpus: the flow ends with the task's one line."""
    short = tmp_path / "short.jsonl"
    short.write_text("".join(Path(prose_corpus).read_text().splitlines(keepends=True)[:4]))
    layer = ["--layer", "1"] if command == "explain-layer" else ["--layers", "1"]
    result = cli(home, command, "--model", tiny_llama_dir, "--corpus", str(short), *layer, "--units", "0-1",
                 "--out", str(tmp_path / "out"))
    assert "exemplars need at least 70" in _one_error_line(result)
    assert not list((tmp_path / "out").rglob("records/*/manifest.json")), "nothing recorded"


def test_explain_layer_reads_the_text_field_that_record_read(home, tiny_llama_dir, prose_corpus, tmp_path):
    """A JSONL corpus with its text under 'body': explain-layer had no --text-field, and its record
    task read 'text' (one line, once the flow had started). Now the run reuses the windows and the
    recording that `record --text-field body` made of the same corpus, and a line further in that
    lacks the field, which only the reading finds, is the task's one line naming the flag."""
    corpus = tmp_path / "c.jsonl"
    paragraphs = [json.loads(line)["text"] for line in Path(prose_corpus).read_text().splitlines()]
    corpus.write_text("".join(json.dumps({"id": i, "body": p}) + "\n" for i, p in enumerate(paragraphs)))
    out = tmp_path / "out"
    common = ["--model", tiny_llama_dir, "--corpus", str(corpus), "--text-field", "body", "--tokens", "20000",
              "--window-len", "8", "--top-k", "8", "--random", "6", "--out", str(out)]
    recorded = cli(home, "record", *common, "--layers", "1")
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    windows = sorted((out / "windows").iterdir())
    layer = ["--layer", "1", "--units", "0-1", "--k", "1", "--shard-size", "2", "--bootstrap", "50"]
    result = cli(home, "explain-layer", *common, *layer)
    assert result.returncode == 0, result.stderr[-4000:]
    run = read_run(out, 1)
    assert sorted((out / "windows").iterdir()) == windows and len(windows) == 1, "the same windows key"
    assert Path(run["records"]["path"]) == Path(recorded.stdout.strip().splitlines()[-1]).resolve(), "the same recording"
    assert run["params"]["text_field"] == "body"
    late = tmp_path / "late.jsonl"  # another path: the record task's cache knows a corpus by its path
    late.write_text(corpus.read_text() + json.dumps({"id": len(paragraphs), "title": "no body"}) + "\n")
    line = _one_error_line(cli(home, "explain-layer", *[str(late) if a == str(corpus) else a for a in common], *layer))
    assert line == (f"error: {late}:{len(paragraphs) + 1} has no string field 'body' — "
                    "name the field that holds the text with --text-field"), line


def test_stage_commands_refuse_another_recording(home, explained, tiny_llama_dir, prose_corpus, tmp_path):
    """An output is read only with the recording it was made from: simulate and score key their
    folders by the explanations and simulations, so a wrong --records would be scored, cached and
    shown against exemplars the units were never explained on."""
    out, _ = explained
    run = read_run(out, 1)
    x, sims, scores = (str(Path(run[s][0]["path"]).parent) for s in ("explanations", "simulations", "scores"))
    recorded = cli(home, "record", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layers", "1",
                   "--tokens", "20000", "--window-len", "8", "--top-k", "8", "--random", "6", "--seed", "1",
                   "--out", str(tmp_path / "other"))
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    other = recorded.stdout.strip().splitlines()[-1]
    fix = f"pass --records {out / 'records' / Path(run['records']['path']).name}"
    o = str(tmp_path / "o")
    for args in (["simulate", "--records", other, "--explanations", x, "--out", o],
                 ["score", "--records", other, "--simulations", sims, "--out", o],
                 ["export", "--records", other, "--scores", scores, "--to", str(tmp_path / "export")],
                 ["view", "--records", other, "--scores", scores, "--site", str(tmp_path / "site")]):
        result = cli(home, *args)
        line = _one_error_line(result)
        assert f"was made from the recording {Path(run['records']['path']).name}, not from {other}" in line, args[0]
        assert fix in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "export").exists() and not (tmp_path / "site").exists()
    right = cli(home, "score", "--records", run["records"]["path"], "--simulations", sims, "--out", o)
    assert right.returncode == 0, right.stderr[-3000:]


def test_an_output_folder_named_with_a_space_and_an_accent(home, tiny_llama_dir, prose_corpus, tmp_path):
    """A path `as_uri` percent-encodes ('my%20out', 'caf%C3%A9') is no Prefect asset key as it is:
    the run still publishes its outputs as assets and finishes, and its site and pointer are there."""
    out = tmp_path / "my out" / "café"
    result = cli(home, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", "1",
                 "--units", "0-1", "--tokens", "20000", "--k", "1", "--bootstrap", "20", "--window-len", "8",
                 "--top-k", "8", "--random", "6", "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "runs" / "layer_1.json").is_file() and (out / "site" / "layer_1" / "index.html").is_file()
    site = out.resolve() / "site" / "layer_1"
    assert f"viewer: {site / 'index.html'}  (serve it: autoexplain view --serve --site {site})" in result.stderr
    from autoexplain.tasks.report import asset

    uri = (out / "records").resolve().as_uri()
    made = asset(uri)
    assert "%" in uri and made.key == uri.replace("%20", "_").replace("%C3%A9", "é") and made.properties.url == uri
    assert asset("file:///plain/path") == "file:///plain/path", "a URI Prefect takes is the key itself"
    long = asset("file:///" + "a" * 600)
    assert len(long.key) <= 512 and long.key.endswith("a" * 100)


def test_a_results_folder_that_cannot_be_one_is_one_line_before_any_work(home, explained, tmp_path):
    """--results was never checked: a file there ran everything, failed every task's commit with a
    traceback and still exited 0."""
    out, _ = explained
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for command in (["explain-layer", "--out", str(tmp_path / "new")], ["rescore", "--out", str(out), "--layer", "1"],
                    ["revise", "--out", str(out), "--layer", "1", "--unit", "0", "--text", "t"]):
        for flag in ("--results", "--site") if command[0] == "explain-layer" else ("--results",):
            result = cli(home, *command, flag, str(blocker / "sub"))
            line = _one_error_line(result)
            assert line.startswith(f"error: {flag}: cannot write under") and "is a file" in line, line
            assert "Flow run" not in result.stderr
    assert not (tmp_path / "new").exists()


def test_a_dask_scheduler_where_nothing_listens_is_one_line_before_any_work(home, explained, tiny_llama_dir,
                                                                            prose_corpus, tmp_path):
    """--dask was found unreachable only when the first shard was submitted, after the recording: a
    30 s wait, then a traceback. Now one connection attempt, before anything is recorded."""
    from tests.llama_server import free_port

    out, _ = explained
    nowhere = f"tcp://127.0.0.1:{free_port()}"  # bound and let go: nothing listens there
    new = ["--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--units", "0-1", "--tokens", "20000",
           "--out", str(tmp_path / "new")]
    for command in (["explain-layer", "--layer", "1", *new], ["explain-model", "--layers", "1", *new],
                    ["rescore", "--out", str(out), "--layer", "1"],
                    ["revise", "--out", str(out), "--layer", "1", "--unit", "0", "--text", "t"]):
        result = cli(home, *command, "--dask", nowhere)
        line = _one_error_line(result)
        assert line.startswith(f"error: --dask: no dask scheduler answers at {nowhere}") and "start the scheduler" in line, line
        assert "Flow run" not in result.stderr, "no flow run was started"
    assert not (tmp_path / "new").exists(), "nothing recorded"


def test_a_dask_address_where_something_else_listens_is_one_line_naming_the_flag(home, explained, tiny_llama_dir,
                                                                                  prose_corpus, tmp_path):
    """A listener that is no dask scheduler passed the one connection of the preflight: the layer was
    recorded, prefect-dask waited 30 s or more to connect, and the line then named the flow's
    parameter ("parameter dask: ..."), not the flag. Now the preflight asks what answers there."""
    from tests.test_flows import not_a_scheduler

    out, _ = explained
    new = ["--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--units", "0-1", "--tokens", "20000",
           "--out", str(tmp_path / "new")]
    with not_a_scheduler() as address:
        for command in (["explain-layer", "--layer", "1", *new], ["explain-model", "--layers", "1", *new],
                        ["rescore", "--out", str(out), "--layer", "1"],
                        ["revise", "--out", str(out), "--layer", "1", "--unit", "0", "--text", "t"]):
            line = _one_error_line(cli(home, *command, "--dask", address))
            assert line.startswith(f"error: --dask: something listens at {address}, but no dask scheduler answers"), line
            assert "parameter dask" not in line and "`dask scheduler`" in line, line
    assert not (tmp_path / "new").exists(), "nothing recorded"


def test_the_revise_flow_without_a_revision_or_with_an_unknown_unit_is_one_line(prefect_results, explained):
    """What a deployment user gets (the CLI always passes a revision): the run's Failed state says
    which parameter is wrong, in one line, before any work."""
    from autoexplain.flows.explain_layer import revise

    out, _ = explained
    before = read_run(out, 1)
    for revisions, says in ((None, "parameter revisions: no revision given"),
                            ({"40": "t"}, "parameter revisions: unit 40 is not among the units this run explains")):
        state = revise(out=str(out), layer=1, revisions=revisions, return_state=True)
        assert state.is_failed() and state.message.startswith(says) and "\n" not in state.message, state.message
    assert read_run(out, 1) == before, "nothing written"


def test_revise_says_what_the_run_s_server_simulator_was_asked(home, fault_server, bench_server, tiny_llama_dir,
                                                               prose_corpus, tmp_path):
    """revise simulates with the run's simulator, which its flags do not name: its LLM line counts
    that simulator's requests, and says so when a repeat asked it nothing (all reused)."""
    srv = fault_server(upstream=bench_server.base_url)
    out = tmp_path / "out"
    run = cli(home, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", "1",
              "--units", "0-1", "--tokens", "20000", "--k", "1", "--bootstrap", "20", "--window-len", "8",
              "--top-k", "8", "--random", "6", "--simulator", f"all-at-once:openai:bench@{srv.base_url}", "--out", str(out))
    assert run.returncode == 0, run.stderr[-4000:]
    revise = ["revise", "--out", str(out), "--layer", "1", "--unit", "0", "--text", "the word the"]
    before = len(srv.requests)
    asked = cli(home, *revise)
    assert asked.returncode == 0, asked.stderr[-4000:]
    sent = len(srv.requests) - before
    from tests.test_llm_costs import answered

    assert sent > 0 and answered(asked.stderr) == sent
    reused = cli(home, *revise)
    assert reused.returncode == 0, reused.stderr[-4000:]
    assert len(srv.requests) == before + sent
    assert "LLM: nothing asked: every stage that needs the LLM was reused" in reused.stderr, reused.stderr[-3000:]
