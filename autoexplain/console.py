"""What the command line shows: progress bars, one-line errors, and the summary at the end of a run.

Shared by the stage commands in `autoexplain.cli` and the flow commands in `flows.cli`.
"""

from __future__ import annotations

import signal
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from autoexplain import interrupt
from autoexplain.errors import UserError
from autoexplain.schemas.contracts import ContractViolation

# Messages are never wrapped: rich's 80 columns in a log file or a pipe cut paths and commands in two.
err = Console(stderr=True, soft_wrap=True)


class _Rate(TextColumn):
    """Items per second: `unit` fixed (tokens, whole numbers) or, when None, the task's own `unit`.

    A finished bar keeps the rate it finished at: its elapsed time runs on until the whole run ends,
    which would make a stage that finished early look slower by the minute. The rate counts what was
    done after the bar appeared (`first`, its count then): a stage reports after its first batch, or
    with units it had already finished (a rerun's memos), and those divided by the moments since the
    bar appeared gave thousands of units a second. Until there is such work it shows none."""

    def __init__(self, unit: str | None = None, digits: int = 1):
        super().__init__("")
        self.unit, self.digits = unit, digits

    def render(self, task):
        seconds = task.finished_time if task.finished else task.elapsed
        done = task.completed - task.fields.get("first", 0)
        unit = self.unit or task.fields.get("unit", "").split(",")[0]  # "units, all layers" -> units/s
        return f"{done / seconds:,.{self.digits}f} {unit}/s" if seconds and done > 0 else f"- {unit}/s"


def _unclipped(width: int) -> Console:
    """Where output goes: `err` in a terminal (rich fits lines to the window); in a log file or a
    Prefect worker's output, a console at least `width` wide, since rich's 80 columns there cut the
    ends off tables and bars."""
    return err if err.is_terminal else Console(stderr=True, width=max(width, err.width))


_BAR_WIDTH = 160  # the longest bar line: description, bar, counts, rate, ETA and elapsed


def progress_bar() -> Progress:
    """A stage command's bars; each task says what it counts (`add_task(..., unit="tokens")`)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} {task.fields[unit]}"),
        _Rate(digits=0),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=_unclipped(_BAR_WIDTH),
        transient=False,
    )


def stage_bars(get_time=None):
    """Bars for a whole explain-layer run, fed by `autoexplain.progress` events from its tasks.

    Tasks of several shards report side by side; each stage's bar adds up the latest count of
    every shard that has started (so its total grows as shards start), and the "scored" bar is the
    flow's count of units (neurons, both polarities, or a coder's latents) finished through scoring. rich unfinishes a bar whose
    total grows, so a stage whose shards had all finished runs on when another starts. `get_time` is
    rich's clock (tests pass their own). Returns (rich Progress, listener)."""
    bars = Progress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} {task.fields[unit]}"),
        _Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=_unclipped(_BAR_WIDTH),
        get_time=get_time,
    )
    ids: dict[str, int] = {}
    parts: dict[str, dict[str, tuple[int, int]]] = {}

    def listener(stage: str, key: str, done: int, total: int) -> None:
        parts.setdefault(stage, {})[key] = (done, total)
        done_all = sum(d for d, _ in parts[stage].values())
        total_all = sum(t for _, t in parts[stage].values())
        if stage not in ids:
            # simulate counts a unit twice (in a shard of two or more): its explanation with the
            # baselines, then its shuffled control
            unit = {"record": "tokens", "simulate": "simulations", "scored": "units",
                    "model": "units, all layers"}.get(stage, "units")
            ids[stage] = bars.add_task(stage, total=total_all, unit=unit, completed=done_all, first=done_all)
        bars.update(ids[stage], completed=done_all, total=max(total_all, bars.tasks[ids[stage]].total or 0))

    return bars, listener


BUDGET_EXIT = 3  # the run stopped at its --budget: not an error, but not finished either
UNANSWERED_EXIT = 4  # the run finished, but some LLM requests got no answer: a rerun asks them again


def unanswered_exit(n: int) -> None:
    """End a run with `n` results (simulations, explanations, classifier trials: rows, not
    requests; a request may carry several) that its LLM server left unanswered, with a line and
    exit 4: its tables show those units as undefined, which a user would otherwise read as the scores."""
    if n:
        err.print(f"[bold yellow]incomplete:[/] {n:,} results got no LLM answer (the server was down, overloaded "
                  "or answered blank; their units are undefined above) — rerun the same command: it asks only for those again",
                  highlight=False)
        raise typer.Exit(UNANSWERED_EXIT)


def budget_stopped(message: str):
    """End a command that its budget stopped: one line, exit code 3."""
    err.print(f"[bold yellow]{message}[/]", highlight=False)
    raise typer.Exit(BUDGET_EXIT)


_SAID: list[bool] = []  # the interrupted line was printed
_USAGE_SAID: list[bool] = []  # the LLM line was printed by this command


# What a stopped run of the stages or flows left behind, and how it goes on.
STAGES_STOPPED = ("nothing of the unfinished stage was kept and the LLM requests in flight were abandoned; rerun the "
                  "same command to go on (it reuses the finished units and the LLM answers already received)")
# The same for a run that asked no LLM (a `record`, or LLM stages all reused): it abandoned no request.
STAGES_STOPPED_NO_LLM = "nothing of the unfinished stage was kept; rerun the same command to go on (it reuses what was finished)"


def _stopped_left(left: str) -> str:
    """`left` as the run's stop says it: the LLM words only where this process sent or read an LLM request."""
    from autoexplain.counters import COUNTS

    asked = COUNTS["llm_sent"] or COUNTS["llm_requests"] or COUNTS["llm_cache_hits"]
    return STAGES_STOPPED_NO_LLM if left == STAGES_STOPPED and not asked else left


def interrupted_line(signum: int, forced: bool = False, left: str = STAGES_STOPPED) -> str:
    """What a run stopped by a signal says (`run_or_exit`), or, `forced`, when it had to be ended.
    `left`: what the command left behind and how to go on (a command without LLMs says its own)."""
    how = f"it was still running {interrupt.GRACE:.0f} s after the signal, so it was ended; " if forced else ""
    return f"[bold yellow]interrupted[/] ({signal.Signals(signum).name}): {how}{_stopped_left(left)}"


def _forced(signum: int, left: str = STAGES_STOPPED) -> None:
    if not _SAID:
        err.print(interrupted_line(signum, forced=True, left=left), highlight=False)


def run_or_exit(fn, left: str = STAGES_STOPPED):
    """Call fn, turning a UserError into one clear line and a non-zero exit (3: the budget stopped
    it). Ctrl-C or SIGTERM stops it within seconds (`interrupt`): one line saying `left`, exit
    128 + the signal's number (130, 143). Whatever ends it, the `LLM:` line comes first when a request
    was sent (`print_llm_usage`), unless the command printed it already."""
    _USAGE_SAID.clear()
    try:
        with interrupt.signals(lambda signum: _forced(signum, left)):
            return _one_line_errors(fn)
    except typer.Exit as e:
        if e.exit_code and not _USAGE_SAID:
            print_llm_usage()
        raise
    except BaseException as e:
        # A run that ends early has still paid for what it sent: the LLM line comes first, whatever ended it.
        if not _USAGE_SAID:
            print_llm_usage()
        if not (interrupt.stopping() or isinstance(e, KeyboardInterrupt)):  # what a stopped run unwinds with
            raise
        _SAID.append(True)
        err.print(interrupted_line(interrupt.signum(), left=left), highlight=False)
        raise typer.Exit(128 + interrupt.signum()) from None


def _one_line_errors(fn):
    from autoexplain.budget import BudgetReached

    try:
        return fn()
    except BudgetReached as e:
        from autoexplain.budget import ledger

        if not _USAGE_SAID:
            print_llm_usage()
        budget_stopped(f"stopped: {e.problem} ({ledger().spent_text()}) — {e.fix}")
    except UserError as e:
        if not _USAGE_SAID:
            print_llm_usage()  # says nothing when no request was sent: bad input stays one line
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2)
    except ContractViolation as e:  # an output the store refused to seal
        if not _USAGE_SAID:
            print_llm_usage()
        failed = "; ".join(e.report.failures)
        err.print(f"[bold red]error:[/] {getattr(e, 'path', '')} breaks its data contract '{e.report.suite}': {failed}",
                  highlight=False)
        raise typer.Exit(2)


def print_llm_usage(server: bool = False) -> None:
    """What this process asked the server LLMs: requests sent, answers read from the response cache
    instead (`llm_cache`), and what the answers cost. `server`: the run's components use a server
    LLM, so asking nothing means every stage that needs it was reused (said, not left silent)."""
    from autoexplain.budget import ledger
    from autoexplain.counters import COUNTS, counted

    sent, cached = COUNTS["llm_sent"], COUNTS["llm_cache_hits"]
    if sent or cached:
        _USAGE_SAID.append(True)
        err.print(f"LLM: {counted(sent, 'request')} sent{_unanswered(sent)}, {counted(cached, 'answer')} from the cache; "
                  f"{ledger().spent_text()}", highlight=False)
    elif server:
        _USAGE_SAID.append(True)
        err.print("LLM: nothing asked: every stage that needs the LLM was reused from an earlier run; "
                  "this run spent $0", highlight=False)


def _unanswered(sent: int) -> str:
    """What became of the requests sent that got no answer, when some did: the retries, 429s and
    timeouts a user tunes --rpm, --concurrency and --timeout by."""
    from autoexplain.counters import COUNTS

    answered, retried = COUNTS["llm_requests"], COUNTS["llm_retries"]
    kinds = {"HTTP 429": COUNTS["llm_429"], "HTTP 5xx": COUNTS["llm_5xx"], "timed out": COUNTS["llm_timeouts"],
             "other faults": COUNTS["llm_faults"]}
    kinds["in flight at the stop"] = max(0, sent - answered - sum(kinds.values()))
    if answered >= sent and not retried:
        return ""
    said = ", ".join(f"{n:,} {what}" for what, n in kinds.items() if n)
    return f" ({answered:,} answered; {said}; {retried:,} sent again)"  # counts of requests: no noun to agree


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_summary(scores_paths: list[Path], result: dict | None = None) -> None:
    """One table for the layer (all shards), then the comparison, the site and the outputs."""
    import polars as pl
    from rich.table import Table

    from autoexplain.summary import compare_markdown, cost_line, dead_line, layer_summary, run_cost

    for part in (result or {}).get("never_fired", []):
        err.print(f"layer {part['layer']} ({part['kind']}): {dead_line(part['asked'], part['units'])}", highlight=False)
    if not scores_paths:  # every unit asked never fired: nothing was scored, and the run is still a run
        err.print("no unit to explain: every unit asked for never fired on the recorded tokens", highlight=False)
        if result is not None:
            _print_where(result)
        return
    scores = pl.concat([pl.read_parquet(p) for p in scores_paths])
    layers = ", ".join(str(v) for v in sorted(set(scores["layer"].to_list())))
    kinds = sorted(set(scores["source"].drop_nulls().to_list())) if "source" in scores.columns else []
    whose = "".join(f" {k}" for k in kinds if k != "mlp")  # a latents run says whose; neurons as ever
    units = scores.select("unit", "polarity").unique().height
    table = Table(title=f"layer {layers}{whose}: test-split scores of {units} units (mean, 95% CI)")
    for col in ("method", "metric", "units", "mean", "95% CI", "beats token-lookup", "undefined"):
        table.add_column(col)
    for r in layer_summary(scores).iter_rows(named=True):
        share = "-" if r["beats_lookup"] is None else f"{100 * r['beats_lookup']:.0f}%"
        table.add_row(r["method"], r["metric"], str(r["units"]), _fmt(r["mean"]),
                      f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", share, str(r["undefined"]))
    _print_table(table)
    err.print(cost_line(run_cost(scores)), highlight=False)
    if result is None:
        return
    if result.get("comparison"):
        err.print(compare_markdown(result["comparison"], "Change against the previous scores"), highlight=False)
    _print_where(result)


def print_model_summary(result: dict) -> None:
    """The model report's table (one row per source, layer and method), its headline, and where it all went."""
    from rich.table import Table

    from autoexplain.model_report import HEADER, headline, lines

    import polars as pl

    report = result["report"]
    table = Table(title="Model report: test-split scores (mean, 95% CI)")
    for col in HEADER:
        table.add_column(col)
    for cells in lines(pl.DataFrame(report["rows"])):
        table.add_row(*cells)
    _print_table(table)
    err.print(headline(report["totals"]), highlight=False)
    _print_where(result)


def _print_table(table) -> None:
    """A table at its full width where nobody reads it in a window (a log file, a Prefect worker's
    output): rich's 80 columns there would cut the method and metric names to 'calibrate…'. A
    terminal gets the table fitted to the window, as rich does."""
    if err.is_terminal:
        err.print(table)
        return
    from rich.measure import Measurement

    _unclipped(Measurement.get(err, err.options.update_width(100_000), table).maximum).print(table)


def _print_where(result: dict) -> None:
    if result.get("site"):
        from autoexplain import remote

        site, here = result["site"], remote.local_path(result["site"])
        shown = str(here) if site.startswith("file://") else f"{site} (a copy here: {here})" if here else site
        serve = f"  (serve it: autoexplain view --serve --site {here.parent})" if here else ""
        err.print(f"viewer: {shown}{serve}", highlight=False)
    err.print(f"outputs: {result['out']}", highlight=False)
    typer.echo(result["out"])


def flat_command_list(app: typer.Typer) -> None:
    """Give each command its docstring's first paragraph as one line for `--help`'s command list:
    typer keeps a docstring's line breaks there (not in the command's own help), which cut its
    sentences mid-line."""
    import inspect

    for info in app.registered_commands:
        doc = info.help or inspect.getdoc(info.callback) or ""
        info.short_help = info.short_help or " ".join(doc.split("\n\n")[0].split())
