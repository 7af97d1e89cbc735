"""What the command modules share: options that several commands take (declared once; `flows.cli`
uses them too) and the readings of arguments that several commands make."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from autoexplain.errors import UserError

WINDOW_LEN = typer.Option(64, "--window-len", help="Tokens per window (the reference uses 64).")
TOP_K = typer.Option(40, "--top-k", help="Top-activating windows kept per unit and polarity.")
N_RANDOM = typer.Option(30, "--random", help="Random windows kept per unit and polarity.")
TEXT_FIELD = typer.Option("text", "--text-field", help="Field (column) that holds the text in .jsonl/.parquet/hub corpora.")
CONCURRENCY = typer.Option(None, "--concurrency", help="LLM requests in flight at once, across units (default: 64 for a server URL, 8 for api.openai.com; each request that times out lowers it by one, down to 1, and quick answers raise it back). Results do not depend on it.")
RPM = typer.Option(None, "--rpm", help="At most this many LLM requests per minute (default: no limit).")
TPM = typer.Option(None, "--tpm", help="At most this many LLM tokens (prompt + completion) per minute; a request takes an estimate "
                   "before it is sent and the server's count once answered (default: no limit).")
RETRIES = typer.Option(None, "--retries", help="Times an LLM request is sent again after a timeout, a lost connection, a 429 or a 5xx, with backoff (default: 6); 0 fails it at once.")
TIMEOUT = typer.Option(None, "--timeout", help="Seconds an LLM request waits for its answer before it is sent again (default: 120). "
                       "Raise it for a slow server: llama.cpp on a CPU reads a 2,000-token prompt in minutes.")
BUDGET = typer.Option(None, "--budget", help="The most this run may spend on server LLMs: dollars ('$5', at the prices of "
                      "autoexplain/prices.json) or tokens ('2M tokens'). The run stops cleanly before the request that would pass it "
                      "(exit code 3); finished units are kept, and the same command with a larger budget goes on from there.")
CACHE = typer.Option(True, "--cache/--no-cache", help="Keep every LLM answer under <out>/llm_cache and never pay for the same request twice "
                     "($AUTOEXPLAIN_LLM_CACHE names another folder, or 'off'). --no-cache sends every request.")
SCORERS = typer.Option("simulation", "--scorers", help="Comma list of scorers: simulation (default), detection, fuzzing, "
                       "fuzzing-active, intruder (each optionally :LLM, default the embedded SmolLM2) and embedding (MiniLM), "
                       "e.g. simulation,detection:openai:MODEL@URL,embedding.")


def records_layer(records: Path, layer: Optional[int]) -> int:
    """The layer a stage command works on: `layer` when the records folder holds it (None: its first)."""
    from autoexplain.storage import read_manifest, require_complete

    require_complete(records, "records", "pass --records, the folder printed by `autoexplain record`")
    recorded = read_manifest(records)["params"]["layers"]
    if layer is not None and layer not in recorded:
        raise UserError(f"--layer {layer} was not recorded in {records} (it has {recorded})", "pass a recorded layer")
    return recorded[0] if layer is None else layer
