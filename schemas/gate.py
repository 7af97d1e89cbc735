"""The store's contract gate: which suite each file of a stage folder answers to.

`autoexplain.storage` calls `check_folder` twice on every path, CLI or flow, cached or not:
- before it seals a folder (writes its manifest): a failing output is never sealed, nor pushed;
- before a stage reads a sealed folder as its input: a failing input stops the stage.

A sealed manifest records, per file, the version of the suite it passed (`contract_versions`). An
input whose bytes still match their digest and whose suite is unchanged passed at sealing and is
not checked again; a folder sealed before a suite edit (or by an older autoexplain) is checked once
per process, remembered by the file's digest.

The check itself is `contracts.check`: a table that passes is certified in polars
(`schemas.contract_fast`, milliseconds); GX runs only on a frame that fails, to report it.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

from autoexplain import layout
from autoexplain.identity import code_identity
from autoexplain.schemas import HERE
from autoexplain.schemas.contracts import SUITES_DIR, ContractViolation, check

_PASSED: set[tuple[str, str, str]] = set()  # (suite, version, file digest) checked in this process


def suite_of(stage: str, name: str) -> str | None:
    """The suite a stage folder's file answers to (None: no contract, e.g. statistics)."""
    if not name.endswith(".parquet"):
        return None
    if stage == "windows":
        return "windows" if name == layout.WINDOWS else None
    if stage == "records":
        return "records" if layout.is_records_table(name) else "unit_stats" if layout.is_stats_table(name) else None
    if stage == "simulations":
        return "explanations" if name == layout.CHOSEN else "simulations"
    if stage == "word_vectors":
        return "word_vectors" if name == layout.WORD_VECTORS else None
    if stage in ("explanations", "scores", "classifications", "negatives"):
        return stage
    return None


@cache
def suite_version(suite: str) -> str:
    """The suite as data plus the checking code and the table schema: a change to any re-checks.

    The checking code is the code identity of `schemas.contracts`, derived from what it imports (it
    spans several modules), and the hash is taken here rather than with `storage.content_key`:
    the store calls this gate, so the gate must not import the store."""
    doc = json.loads((SUITES_DIR / f"{suite}.json").read_text())
    parts = [doc, code_identity("autoexplain.schemas.contracts"), (HERE / f"{doc.get('schema', suite)}.json").read_text()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _manifest(directory: Path) -> dict:
    return json.loads((directory / layout.MANIFEST).read_text())


def _window_len(stage: str, directory: Path, manifest: dict) -> int | None:
    """Followed through the inputs to the windows folder, which owns it; None when a folder on the
    way is not there (a table assembled by hand, an input on another machine)."""
    try:
        if stage == "windows":
            return manifest["params"]["window_len"]
        if stage == "records":
            windows = layout.sibling(directory, "windows", manifest["inputs"]["windows"])
            return _window_len("windows", windows, _manifest(windows))
        records = layout.input_of(directory, manifest["inputs"]["records"])
        return _window_len("records", records, _manifest(records))
    except (KeyError, OSError, ValueError):
        return None


def params_for(suite: str, stage: str, directory: Path, manifest: dict) -> dict | None:
    """The suite's parameters for this folder, or None when they cannot be known (not checked)."""
    if suite == "negatives":  # the folder's own parameters: how many of each kind, what counts as active
        p = manifest["params"]
        if "per_unit" not in p or "active_fraction" not in p:
            return None
        return {"max_rank": p["per_unit"] - 1, "active_fraction": p["active_fraction"]}
    if suite not in ("records", "windows", "simulations"):
        return {}
    window_len = _window_len(stage, directory, manifest)
    if window_len is None:
        return None
    if suite == "records":
        p = manifest["params"]
        return {"window_len": window_len, "max_exemplars": p["top_k"], "min_random": p["n_random"]}
    return {"window_len": window_len}


def check_folder(stage: str, directory: Path, manifest: dict) -> dict[str, str]:
    """Check every file of a folder that has a suite; returns {file: suite version} for the manifest.
    Raises `ContractViolation` with `.path`, the file that broke its contract."""
    import pyarrow.parquet as pq

    passed = {}
    recorded = manifest.get("contract_versions", {})
    for name, digest in manifest.get("outputs", {}).items():
        suite = suite_of(stage, name)
        params = None if suite is None else params_for(suite, stage, directory, manifest)
        if params is None:
            continue
        version = suite_version(suite)
        if recorded.get(name) != version and (suite, version, digest) not in _PASSED:
            try:
                check(pq.read_table(directory / name), suite, params)
            except ContractViolation as e:
                e.path = directory / name
                raise
            _PASSED.add((suite, version, digest))
        passed[name] = version
    return passed
