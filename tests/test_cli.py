"""The command line as a user meets it: help text, and one clear line for each kind of bad input."""

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

EXE = [sys.executable, "-m", "autoexplain.flows.cli"]  # the console script's module


def run(*args, cwd=None, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([*EXE, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_help_reads_well():
    top = run("--help")
    assert top.returncode == 0
    assert "record" in top.stdout and "Explain what each neuron" in top.stdout
    rec = run("record", "--help")
    for flag in ("--model", "--corpus", "--layers", "--tokens", "--out"):
        assert flag in rec.stdout


def test_the_command_list_keeps_each_description_whole():
    """A docstring's line break used to cut the command list's sentences mid-line ('A dataset
    `publish` wrote comes' / 'back whole'); at a width where each fits one line, each does."""
    import inspect

    from autoexplain.flows.cli import app

    top = run("--help", env={"COLUMNS": "1000"})
    for info in app.registered_commands:
        first = " ".join(inspect.getdoc(info.callback).split("\n\n")[0].split())
        name = info.name or info.callback.__name__.replace("_", "-")
        lines = [l for l in top.stdout.splitlines() if f" {name} " in l]
        assert any(first in l for l in lines), (name, first, lines)


def _one_error_line(result):
    lines = [l for l in result.stderr.splitlines() if l.strip() and "Loading weights" not in l]
    errors = [l for l in lines if l.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return errors[0]


@pytest.fixture
def base(tiny_llama_dir, tmp_path):
    return ["record", "--model", tiny_llama_dir, "--out", str(tmp_path / "out"), "--window-len", "8",
            "--top-k", "4", "--random", "4", "--reservoir", "16"]


def test_record_runs_and_prints_the_output_folder(base, prose_file, tmp_path):
    result = run(*base, "--corpus", str(prose_file), "--layers", "0,2", "--tokens", "2000")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "out" / "records"
    assert pl.read_parquet(folder / "layer_2.records.parquet")["unit"].n_unique() == 48
    assert "tokens/s" in result.stderr and "ETA" in result.stderr
    assert "asked: using them all" not in result.stderr, "the corpus held the 2,000 tokens asked: no notice"
    # The stage's root given for its folder: the error names the folder to pass.
    line = _one_error_line(run("explain", "--records", str(folder.parent), "--out", str(tmp_path / "out")))
    assert line.endswith(f"pass the records folder inside it: {folder}"), line
    # a unit the layer lacks, named as the flag, as explain-layer names it
    line = _one_error_line(run("explain", "--records", str(folder), "--layer", "2", "--units", "48", "--out", str(tmp_path / "o")))
    assert line.startswith("error: --units: unit 48 is out of range"), line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--layers", "7"], "layer 7 is out of range"),
        (["--layers", "x"], "--layers: cannot read layers 'x'"),
        (["--layers", "1-"], "--layers: cannot read layers '1-': '1-' is neither a layer nor a range FROM-TO"),
        (["--window-len", "257"],
         "--window-len 257 is longer than the model's context of 256 positions — give --window-len 256 or less"),
        (["--corpus", "/no/such/file.txt"], "does not exist"),
        (["--tokens", "0"], "--tokens: must be at least 1"),
        (["--tokens", "10"], "--tokens: 10 tokens make 1 windows of 8, fewer than the 4 top + 4 random"),
        (["--window-len", "0"], "--window-len: must be at least 2"),
        (["--reservoir", "2"], "--reservoir: a sample of 2 windows cannot hold the 4 random exemplars"),
        (["--per-quantile", "-1"], "--per-quantile: must be at least 0"),
        (["--seed", "-1"], "--seed: must be at least 0"),
        (["--top-k", "5000"], "need at least 5004"),
    ],
)
def test_bad_input_gets_one_clear_line(base, prose_file, tmp_path, extra, needle):
    args = [*base, "--corpus", str(prose_file), *extra]
    line = _one_error_line(run(*args))
    assert needle in line
    assert not list((tmp_path / "out").rglob("records/*/*.parquet")), "nothing half-written"


def test_a_window_past_the_model_s_context_is_one_line_before_the_model_loads(tiny_gpt2_dir, prose_file, tmp_path):
    """GPT-2's learned positions end at n_positions: a longer window was an IndexError traceback
    after the weights loaded (three of them in a flow, which retries the recording)."""
    result = run("record", "--model", str(tiny_gpt2_dir), "--corpus", str(prose_file), "--layers", "1", "--tokens", "20000",
                 "--window-len", "257", "--top-k", "4", "--random", "4", "--out", str(tmp_path / "out"))
    line = _one_error_line(result)
    assert line == ("error: --window-len 257 is longer than the model's context of 256 positions — "
                    "give --window-len 256 or less"), line
    assert "subject" not in result.stderr and not (tmp_path / "out").exists(), "refused before loading or writing"


def test_a_corpus_shorter_than_the_tokens_asked_says_so_once(base, prose_file):
    result = run(*base, "--corpus", str(prose_file), "--layers", "1", "--tokens", "20000")
    assert result.returncode == 0, result.stderr[-3000:]
    windows = int(result.stderr.split("recorded ")[-1].split()[0].replace(",", ""))
    notice = (f"corpus {prose_file} holds {windows * 8:,} tokens (in whole windows of 8) of the 20,000 asked: "
              "using them all")
    assert result.stderr.count(notice) == 1, result.stderr[-3000:]


@pytest.mark.parametrize("name, value", [("AUTOEXPLAIN_CONTRACTS", "gxx"), ("AUTOEXPLAIN_LOCAL_BATCH", "many"),
                                         ("AUTOEXPLAIN_LOCAL_BATCH", "0")])
def test_a_misspelt_switch_is_refused_before_any_work(base, prose_file, tmp_path, name, value):
    line = _one_error_line(run(*base, "--corpus", str(prose_file), "--tokens", "2000", env={name: value}))
    assert f"{name}={value!r}" in line and "unset it" in line
    assert not (tmp_path / "out").exists(), "nothing written"


def test_an_output_folder_that_cannot_be_made_is_refused_first(base, prose_file, tmp_path):
    """As root (how CI runs), `os.access` calls /proc writable; making the folder fails after the
    model was loaded, with a traceback. The check makes a folder there for real."""
    args = [("/proc/autoexplain-out" if a == str(tmp_path / "out") else a) for a in base]
    line = _one_error_line(run(*args, "--corpus", str(prose_file)))
    assert line == "error: --out: cannot write under /proc/autoexplain-out: /proc is not writable — pass a writable folder"


def test_bad_corpora(base, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    assert "not valid UTF-8" in _one_error_line(run(*base, "--corpus", str(latin1)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in _one_error_line(run(*base, "--corpus", str(empty)))
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert "shorter than one window" in _one_error_line(run(*base, "--corpus", str(short)))
    # A file that exists and that nobody can read, root included (CI runs as root, and root reads a
    # chmod 0 file): /proc/self/mem fails its first read at offset 0 with EIO.
    unreadable = tmp_path / "locked.txt"
    unreadable.symlink_to("/proc/self/mem")
    line = _one_error_line(run(*base, "--corpus", str(unreadable)))
    assert f"cannot read corpus file {unreadable}: Input/output error" in line


def _bad_corpus(tmp_path, case):
    """A corpus of each kind the recorder refuses, found from the start of its files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / {"field": "c.jsonl", "json": "c.jsonl", "empty": "c.txt", "latin1": "c.txt",
                       "folder": "corpus", "truncated": "c.parquet", "numbers": "c.parquet"}[case]
    if case == "field":
        path.write_text("\n".join('{"body": "The river ran quietly past the old mill."}' for _ in range(50)))
    elif case == "json":
        path.write_text('\n{"text": "one", \n{"text": "two"}\n')
    elif case in ("empty", "latin1"):
        path.write_bytes(b"" if case == "empty" else "caf\u00e9 ".encode("latin-1") * 100)
    elif case == "folder":
        path.mkdir()
        (path / "notes.md").write_text("not a corpus file")
    else:
        pq.write_table(pa.table({"text": ["one two three"] * 100 if case == "truncated" else list(range(100))}), path)
        if case == "truncated":
            path.write_bytes(path.read_bytes()[:-20])  # the footer cut off, as by an interrupted copy
    return path


BAD_CORPORA = {
    "field": "{path}:1 has no string field 'text' — name the field that holds the text with --text-field",
    "json": "{path}:2 is not valid JSON (Expecting property name enclosed in double quotes) — write one JSON object per line",
    "empty": "corpus '{path}' is empty — give a corpus with some text in it",
    "latin1": "{path} is not valid UTF-8 (bad byte 0xe9 at offset 3)",
    "folder": "folder {path} has no .txt/.jsonl/.parquet files — point --corpus at text files",
    "truncated": "{path} is not a readable parquet file (",
    "numbers": "{path} column 'text' holds int64, not text — name the field that holds the text with --text-field",
}


@pytest.mark.parametrize("command", ["record", "explain-layer", "explain-model"])
@pytest.mark.parametrize("case", list(BAD_CORPORA))
def test_a_bad_corpus_is_one_line_before_the_model_loads(tiny_llama_dir, tmp_path, command, case):
    """The corpus's content was read only after the subject loaded (8-16 s for SmolLM2; the flow
    command had started Prefect and its record task): each of these is now the recorder's own line,
    found by the preflight from the start of the files, with nothing loaded, started or written."""
    path = _bad_corpus(tmp_path, case)
    out = tmp_path / "out"
    own = {"record": ["--layers", "1", "--reservoir", "16"], "explain-layer": ["--layer", "1", "--units", "0-1"],
           "explain-model": ["--layers", "1", "--units", "0-1"]}[command]
    result = run(command, "--model", tiny_llama_dir, "--corpus", str(path), *own, "--tokens", "2000",
                 "--window-len", "8", "--top-k", "4", "--random", "4", "--out", str(out))
    assert _one_error_line(result).startswith("error: " + BAD_CORPORA[case].format(path=path)), result.stderr
    assert "loaded in" not in result.stderr and "Loading weights" not in result.stderr, "no model was loaded"
    assert "Flow run" not in result.stderr, "no flow was started"
    assert not out.exists(), "nothing written"


def test_unknown_model(tmp_path):
    line = _one_error_line(run("record", "--model", "no-org/no-model-here", "--out", str(tmp_path)))
    assert "cannot load model 'no-org/no-model-here'" in line


@pytest.mark.slow
def test_record_on_embedded_defaults(tmp_path):
    result = run("record", "--tokens", "4096", "--out", str(tmp_path), "--top-k", "8", "--random", "8",
                 "--reservoir", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(result.stdout.strip().splitlines()[-1])
    recs = pl.read_parquet(folder / "layer_15.records.parquet")
    assert recs["unit"].n_unique() == 1536 and set(recs["polarity"]) == {1, -1}


def test_explain_stage_commands_reject_bad_input(tmp_path):
    assert "not a finished records folder" in _one_error_line(run("explain", "--records", str(tmp_path / "none")))
    assert "not a finished explanations folder" in _one_error_line(
        run("simulate", "--records", str(tmp_path), "--explanations", str(tmp_path / "none")))
    assert "not a finished simulations folder" in _one_error_line(
        run("score", "--records", str(tmp_path), "--simulations", str(tmp_path / "none")))
    assert "no explanation files" in _one_error_line(run("import", "--from", str(tmp_path), "--layer", "3"))
    assert "not a finished scores folder" in _one_error_line(run("view", "--scores", str(tmp_path / "none")))


def test_units_are_parsed_with_clear_errors():
    from autoexplain.errors import UserError
    from autoexplain.indices import parse_units

    assert parse_units("0-2,7") == [0, 1, 2, 7] and parse_units(None) is None
    assert parse_units("all", 3) == [0, 1, 2]
    with pytest.raises(UserError, match="cannot read units 'x'"):
        parse_units("x")
    with pytest.raises(UserError, match="unit 5 is out of range: the layer has units 0..3"):
        parse_units("1,5", 4)
    # an unfinished range is no single unit, and no range runs from or to a negative unit
    for spec in ("0-", "0--3", "-3", "3,", "1-2-3"):
        with pytest.raises(UserError) as e:
            parse_units(spec, 10)
        bad = spec.split(",")[-1] if spec != "3," else ""
        assert e.value.problem == f"cannot read units '{spec}': '{bad}' is neither a unit nor a range FROM-TO", e.value
        assert e.value.fix == "use a range like 0-99, a list like 3,7, or 'all' (units count from 0)"


def test_every_command_reads_layers_one_way():
    """record, publish and explain-model read --layers with `model_plan.parse_layers`, each with
    its own spelling of the parameter and its own default when none is given."""
    from autoexplain import preflight
    from autoexplain.errors import UserError
    from autoexplain.model_plan import parse_layers

    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("3, 1-2", 4) == [1, 2, 3]
    assert parse_layers([2, 0, 2], 4) == [0, 2]
    assert parse_layers("70", None) == [70]  # publish: no model to check the range against
    for spec, says in (("2-1", "layers: the layer range '2-1' runs backwards"), ("4", "layers: layer 4 is out of range"),
                       ("x", "layers: cannot read layers 'x'"), ("", "layers: '' names no layer")):
        with pytest.raises(UserError) as e:
            parse_layers(spec, 4)
        assert e.value.problem.startswith("parameter " + says), e.value.problem
        with pytest.raises(UserError) as e:
            parse_layers(spec, 4, preflight.cli_flag)
        assert e.value.problem.startswith("--" + says), e.value.problem
        assert "unit" not in e.value.problem + e.value.fix  # said of layers, not of the units' reader it shares


STOPPED = """
import os, signal, sys, time
import typer
from autoexplain import console, interrupt
from autoexplain.counters import COUNTS

COUNTS["llm_sent"] = int(sys.argv[1])  # what the run sent before the stop (a `record` sends none)

def work():  # a stage stopped by Ctrl-C as one is: the signal, then the stage's next check
    os.kill(os.getpid(), signal.SIGINT)
    while True:
        interrupt.check()
        time.sleep(0.01)

try:
    console.run_or_exit(work)
except typer.Exit as e:  # as the command line ends
    sys.exit(e.exit_code)
"""


@pytest.mark.parametrize("sent", [0, 2])
def test_a_stop_speaks_of_llm_requests_only_when_some_were_sent(sent):
    """Ctrl-C in `record` said the LLM requests in flight were abandoned and their answers reused:
    none had been sent."""
    r = subprocess.run([sys.executable, "-c", STOPPED, str(sent)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "400"})
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 130 and line.startswith("interrupted (SIGINT): nothing of the unfinished stage was kept"), r.stderr
    assert ("LLM" in line) == bool(sent), line
    assert "rerun the same command" in line
