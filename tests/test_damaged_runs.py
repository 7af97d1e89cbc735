"""A finished run damaged on disk: a stage file cut short, the run pointer cut short, an output's
folder deleted. `publish`, `rescore` and `revise` read a run by its pointer; each says what is wrong
in one line (exit 2, no traceback) before any work, writes nothing, and names the file. The flows,
called as a deployment calls them, end in a Failed state with the same line.

One tiny run for the module (in this process); each test damages its own copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_cli import _one_error_line
from tests.test_cli_runs import cli, home  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def made(prefect_results, tiny_llama_dir, prose_corpus, tmp_path_factory) -> Path:
    from autoexplain.flows.explain_layer import explain_layer

    out = tmp_path_factory.mktemp("damaged") / "out"
    explain_layer(layer=1, units="0-3", model=tiny_llama_dir, corpus=str(prose_corpus), tokens=20_000, k=1, n_boot=20,
                  out=str(out), site="none", window_len=8, top_k=8, n_random=6)
    assert (out / "runs" / "layer_1.json").is_file()
    return out


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under a folder, by relative path: its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def damaged(made: Path, tmp_path: Path, how) -> tuple[Path, Path]:
    """A copy of the run with `how(copy)` done to it: (the copy, the file or folder damaged)."""
    copy = tmp_path / "out"
    shutil.copytree(made, copy)
    return copy, how(copy)


def cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def fails_in_one_line(home: Path, copy: Path, named: Path, *args: str) -> str:  # noqa: F811
    """Run a command on the damaged copy: its one error line, naming `named`; nothing written."""
    before = files(copy)
    result = cli(home, *args)
    line = _one_error_line(result)
    assert str(named) in line, line
    assert "Flow run" not in result.stderr, "no flow started: found by the preflight"
    assert files(copy) == before, "nothing written"
    return line.removeprefix("error: ")


def publish_fails(home: Path, copy: Path, named: Path, tmp_path: Path) -> str:  # noqa: F811
    to = tmp_path / "dataset"
    line = fails_in_one_line(home, copy, named, "publish", "--out", str(copy), "--to", str(to), "--license", "cc-by-4.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no dataset, nor a half-built one beside it"
    return line


def flow_fails(flow, line: str, monkeypatch, **params) -> None:
    """The flow called directly (a deployment's run) ends, before any work, in a Failed state whose
    message is the command's line."""
    from autoexplain.flows import explain_layer

    monkeypatch.setattr(explain_layer, "_rescore", lambda *a, **k: pytest.fail("work started"))
    state = flow(**params, return_state=True)
    assert state.is_failed() and state.message == line, state.message


def test_a_truncated_recording_stops_publish(made, home, tmp_path, monkeypatch):  # noqa: F811
    from autoexplain.flows.publish import publish_dataset

    copy, cut = damaged(made, tmp_path, lambda c: cut_in_half(next(c.glob("records/*/layer_1.records.parquet"))))
    line = publish_fails(home, copy, cut, tmp_path)
    assert line.startswith(f"{cut} does not match its manifest (changed or truncated) — rerun the explain-layer command")
    flow_fails(publish_dataset, line, monkeypatch, out=str(copy), to=str(tmp_path / "dataset"), license="cc-by-4.0")
    assert not (tmp_path / "dataset").exists()


def test_truncated_scores_stop_publish_and_rescore_before_any_work(made, home, tmp_path, monkeypatch):  # noqa: F811
    """rescore compares with the previous scores: it re-simulated and re-scored everything, then
    failed on them with a traceback."""
    from autoexplain.flows.explain_layer import rescore
    from autoexplain.flows.publish import publish_dataset

    copy, cut = damaged(made, tmp_path, lambda c: cut_in_half(next(c.glob("scores/*/layer_1.parquet"))))
    line = publish_fails(home, copy, cut, tmp_path)
    assert line.startswith(f"{cut} does not match its manifest (changed or truncated)"), line
    # explain-layer wrote that folder: `autoexplain score` with its default flags (not the run's
    # --bootstrap) would write another key while the run pointer still names the damaged one
    assert line.endswith("— rerun the explain-layer command that made this run (it rebuilds the damaged folder)"), line
    assert "autoexplain score" not in line, line
    assert fails_in_one_line(home, copy, cut, "rescore", "--out", str(copy), "--layer", "1", "--bootstrap", "20") == line
    flow_fails(rescore, line, monkeypatch, out=str(copy), layer=1, n_boot=20)
    flow_fails(publish_dataset, line, monkeypatch, out=str(copy), to=str(tmp_path / "dataset"), license="cc-by-4.0")


def test_a_truncated_run_pointer_is_one_line_naming_it(made, home, tmp_path, monkeypatch):  # noqa: F811
    from autoexplain.flows.explain_layer import rescore, revise
    from autoexplain.flows.publish import publish_dataset

    def cut_pointer(c: Path) -> Path:
        pointer = c / "runs" / "layer_1.json"
        pointer.write_bytes(pointer.read_bytes()[:300])
        return pointer

    copy, pointer = damaged(made, tmp_path, cut_pointer)
    line = publish_fails(home, copy, pointer, tmp_path)
    assert line.startswith(f"{pointer} is not a readable run pointer (changed or truncated) — delete it and rerun "
                           "the explain-layer command"), line
    out = ["--out", str(copy), "--layer", "1"]
    assert fails_in_one_line(home, copy, pointer, "rescore", *out) == line
    assert fails_in_one_line(home, copy, pointer, "revise", *out, "--unit", "1", "--text", "hi") == line
    flow_fails(rescore, line, monkeypatch, out=str(copy), layer=1)
    flow_fails(revise, line, monkeypatch, out=str(copy), layer=1, revisions={"1": "hi"})
    flow_fails(publish_dataset, line, monkeypatch, out=str(copy), to=str(tmp_path / "dataset"), license="cc-by-4.0")


def test_rescore_checks_the_run_s_explanations_before_any_work_as_revise_does(made, home, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    """A deleted explanations folder: revise said so in its preflight; rescore only after its
    tasks had started, from a failed task."""
    from autoexplain.flows.explain_layer import rescore, revise

    def delete_explanations(c: Path) -> Path:
        folder = next(c.glob("explanations/*"))
        shutil.rmtree(folder)
        return folder

    copy, folder = damaged(made, tmp_path, delete_explanations)
    out = ["--out", str(copy), "--layer", "1"]
    line = fails_in_one_line(home, copy, folder, "revise", *out, "--unit", "1", "--text", "hi")
    assert line.startswith(f"{folder} does not exist"), line
    assert fails_in_one_line(home, copy, folder, "rescore", *out) == line
    flow_fails(rescore, line, monkeypatch, out=str(copy), layer=1)
    flow_fails(revise, line, monkeypatch, out=str(copy), layer=1, revisions={"1": "hi"})


def test_a_model_changed_since_the_recording_stops_rescore_and_revise_before_any_work(home, tiny_llama_dir,  # noqa: F811
                                                                                     prose_corpus, tmp_path, monkeypatch):
    """The hard negatives of a classifier scorer run the run's model again on held-out windows: a
    model changed since the recording failed the negatives task after everything was simulated
    again (paid, with an LLM), and the run then stopped on its classify tasks, which never ran,
    with a traceback and exit 1."""
    from safetensors.torch import load_file, save_file

    from autoexplain.flows.explain_layer import explain_layer, rescore, revise
    from autoexplain.storage import read_run

    model = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    out = tmp_path / "out"
    explain_layer(layer=1, units="0-1", model=str(model), corpus=str(prose_corpus), tokens=20_000, k=1, n_boot=20,
                  out=str(out), site="none", window_len=8, top_k=8, n_random=6, scorers="simulation,embedding")
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    save_file({**tensors, name: tensors[name] * 1.5}, weights)  # fine-tuned in place, say
    records = Path(read_run(out, 1)["records"]["path"])
    args = ["--out", str(out), "--layer", "1"]
    line = fails_in_one_line(home, out, records, "rescore", *args, "--scorers", "simulation,embedding")
    assert line.startswith(f"the model '{model}' is not the one {records} was recorded with"), line
    assert fails_in_one_line(home, out, records, "revise", *args, "--unit", "1", "--text", "hi") == line
    flow_fails(rescore, line, monkeypatch, out=str(out), layer=1, scorers="simulation,embedding")
    flow_fails(revise, line, monkeypatch, out=str(out), layer=1, revisions={"1": "hi"})


def test_a_failed_negatives_task_ends_the_run_with_its_own_line(made, tmp_path, monkeypatch):
    """What the preflight cannot see (the model's folder damaged while the run goes on, say) fails
    the negatives task: the run ends with that task's line, not with its classify tasks, which
    never ran, raising that they are still pending."""
    from autoexplain import negatives
    from autoexplain.errors import UserError
    from autoexplain.flows.explain_layer import rescore

    def fails(*args, **kwargs):
        raise UserError("the model's weights went missing mid-run", "put them back and rerun")

    copy, _ = damaged(made, tmp_path, lambda c: c)
    monkeypatch.setattr(negatives, "run_negatives", fails)
    state = rescore(out=str(copy), layer=1, n_boot=20, scorers="simulation,embedding", return_state=True)
    assert state.is_failed() and state.message == "the model's weights went missing mid-run — put them back and rerun", \
        state.message
