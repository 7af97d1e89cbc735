"""Fail before working, for `revise`: the run it revises, and each revision checked against what
that run explained and placed in the explanations output that holds its unit.

A revision replaces the explainer's text of one unit and polarity ('12:-1' -> text). It is applied
on top of the run's own explanations outputs, whatever made them (an explainer, an earlier revise,
`import` of a published dataset): nothing is recorded or explained again, so revising a paid or an
imported run pays nothing but the re-simulation of the shards that hold a revised unit. The other
shards keep their simulations and scores (the same keys: reused).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from autoexplain import preflight, run_lookup
from autoexplain.errors import UserError
from autoexplain.registry import DEFAULT_SCORER, DEFAULT_SIMULATOR


@dataclass
class RevisePlan:
    run: dict  # the run pointer revised
    shards: list[dict[str, str]]  # per explanations output of the run, in order: its revisions (often none)
    merged: dict[str, str]  # the run's earlier revisions and these: what the new pointer records
    simulator: str  # the run's, as are the scorers and the bootstrap
    scorers: str
    n_boot: int
    budget: object = None


def read_revisions(path: Path, flag: str = "--file") -> dict[str, str]:
    """A JSON object {"UNIT[:POLARITY]": text}, or JSON lines / CSV with unit, polarity, text."""
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist", "pass a JSON, JSON-lines or CSV file of revisions")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows = [{"unit": k, "text": v} for k, v in data.items()] if isinstance(data, dict) else data
        return {f"{r['unit']}:{r.get('polarity') or 1}" if ":" not in str(r["unit"]) else str(r["unit"]): r["text"]
                for r in rows}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read revisions from {path} ({type(e).__name__}: {e})",
                        'write {"12:-1": "text", ...}, JSON lines or CSV with unit, polarity, text') from None


def _explained(ref: dict) -> set[tuple[int, int]]:
    """The (unit, polarity) pairs an explanations output holds."""
    from autoexplain.storage import local_ref

    table = pq.read_table(local_ref(ref)["path"], columns=["unit", "polarity"])
    return set(zip(table.column("unit").to_pylist(), table.column("polarity").to_pylist()))


def plan(out: str, layer: int | None, source: str | None, revisions: dict[str, str] | None,
         spell: preflight.Spelling = preflight.flow_name, name: str = "revisions", budget: str | None = None) -> RevisePlan:
    """Everything a revise checks before any work: the run, its simulator and scorers still usable,
    the budget, and every revision a unit and polarity the run explained."""
    run = run_lookup.run_of(out, layer, source, spell)
    params = run["params"]
    simulator = params.get("simulator") or DEFAULT_SIMULATOR
    scorers = params.get("scorers") or DEFAULT_SCORER
    preflight.check_simulator(simulator, spell)
    preflight.check_scorers(scorers, spell)
    run_lookup.check_hard_negatives(run, scorers, source, spell)
    limit = preflight.check_budget(budget, spell, simulator=simulator, scorers=scorers)
    if not revisions:
        raise UserError(f"{spell(name)}: no revision given", 'give e.g. {"12:-1": "years written in digits"}')
    held = [_explained(ref) for ref in run["explanations"]]
    pairs = set().union(*held)
    parsed = preflight.check_revisions(revisions, sorted({u for u, _ in pairs}), spell, name,
                                       tuple(sorted({p for _, p in pairs}, reverse=True)) or (1,))
    missing = sorted(set(parsed) - pairs)
    if missing:
        unit, polarity = missing[0]
        raise UserError(f"{spell(name)}: unit {unit} polarity {polarity:+d} was not explained in this run",
                        "revise a unit and polarity the run explained (a unit that never fired has no explanation)")
    shards = [{f"{u}:{p:+d}": text for (u, p), text in sorted(parsed.items()) if (u, p) in mine} for mine in held]
    earlier = preflight.check_revisions(params.get("revisions"), None)
    merged = {f"{u}:{p:+d}": t for (u, p), t in sorted({**earlier, **parsed}.items())}
    return RevisePlan(run, shards, merged, simulator, scorers, int(params.get("n_boot") or 1000), limit)
