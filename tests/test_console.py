"""The command line's stage bars: a rate, an elapsed time and an ETA that say what the stage did."""

from __future__ import annotations

from rich.progress import TimeElapsedColumn

from autoexplain import console


def _shown(bars, stage: int) -> tuple[str, str]:
    task = bars.tasks[stage]
    return console._Rate().render(task), str(TimeElapsedColumn().render(task))


def test_a_finished_stage_keeps_its_rate_while_the_run_goes_on():
    clock = [0.0]
    bars, listener = console.stage_bars(get_time=lambda: clock[0])
    listener("record", "layer 3", 0, 1_000)
    clock[0] = 10.0
    listener("record", "layer 3", 1_000, 1_000)  # 100 tokens a second
    clock[0] = 300.0  # explaining, simulating, scoring
    listener("explain", "shard 0", 5, 10)
    assert _shown(bars, 0) == ("100.0 tokens/s", "0:00:10")
    assert _shown(bars, 1) == ("- units/s", "0:00:00")  # 5 done before it showed: no work of its own yet


def test_a_stage_runs_again_when_another_shard_starts_after_it_finished():
    clock = [0.0]
    bars, listener = console.stage_bars(get_time=lambda: clock[0])
    listener("simulate", "shard 0", 0, 100)
    clock[0] = 20.0
    listener("simulate", "shard 0", 100, 100)  # finished, for now
    clock[0] = 30.0
    listener("simulate", "shard 1", 0, 100)
    assert not bars.tasks[0].finished, "a bar that still has 100 units to go is not finished"
    clock[0] = 50.0
    listener("simulate", "shard 1", 50, 100)
    assert _shown(bars, 0) == ("3.0 simulations/s", "0:00:50")  # 150 in 50 s, not frozen at 20 s
    clock[0] = 60.0
    listener("simulate", "shard 1", 100, 100)
    clock[0] = 500.0
    assert _shown(bars, 0) == ("3.3 simulations/s", "0:01:00")


def test_bars_in_a_log_are_not_cut(monkeypatch, capsys):
    """Written to a file or a worker's log (no terminal, no COLUMNS), the final bars end with their
    elapsed time, not at rich's 80 columns ('ETA 0:00:…')."""
    monkeypatch.delenv("COLUMNS", raising=False)
    clock = [0.0]
    bars, listener = console.stage_bars(get_time=lambda: clock[0])
    with bars:
        listener("record", "layer 15", 0, 1_000_000)
        listener("model", "layer 15", 0, 30_000)
        clock[0] = 160.0
        listener("record", "layer 15", 1_000_000, 1_000_000)
        listener("model", "layer 15", 30_000, 30_000)
    lines = [" ".join(line.split()) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "…" not in "".join(lines)
    assert lines[0].startswith("record") and lines[0].endswith(" 6,250.0 tokens/s ETA 0:00:00 0:02:40"), lines[0]
    assert lines[1].startswith("model") and lines[1].endswith("30,000/30,000 units, all layers 187.5 units/s ETA 0:00:00 0:02:40"), lines[1]


def test_a_run_with_unanswered_requests_ends_with_a_line_and_exit_4(capsys):
    """Its tables show those units as undefined; the line says why and what to do, and the exit code
    tells a scheduler the run is not finished. (The flow counts them: test_flows.py.)"""
    import pytest
    import typer

    with pytest.raises(typer.Exit) as ended:
        console.unanswered_exit(253)
    assert ended.value.exit_code == console.UNANSWERED_EXIT == 4
    line = " ".join(capsys.readouterr().err.split())
    assert line.startswith("incomplete: 253 results got no LLM answer") and "rerun the same command" in line
    console.unanswered_exit(0)  # final: no line
    assert capsys.readouterr().err == ""


def test_a_bar_s_rate_counts_only_what_was_done_after_it_appeared():
    """A stage's first report can come after its first batch, or count a rerun's memoised units: six
    units reported at once, in the moment the bar appeared, showed as 17,030.8 units/s."""
    clock = [100.0]
    bars, listener = console.stage_bars(get_time=lambda: clock[0])
    listener("explain", "shard 0", 6, 6)
    clock[0] = 100.0004
    assert _shown(bars, 0)[0] == "- units/s"
    listener("simulate", "shard 0", 40, 100)  # 40 from memos
    clock[0] = 130.0
    listener("simulate", "shard 0", 100, 100)  # 60 simulated in 30 s
    assert _shown(bars, 1)[0] == "2.0 simulations/s"
