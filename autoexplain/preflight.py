"""Fail before working: every parameter of a command, flow or deployment, checked in milliseconds.

A run that records a million tokens and then trips over a misspelt simulator wastes minutes and
prints a traceback. Everything that can be known up front is checked here, before the first model
load: numbers, unit and layer ranges (from the model's config, never its weights), explainer and
simulator specs, the LLM server (its model list: the key and the model; for a simulator that reads
prompt logprobs, one tiny echo request; no retries), the corpus and the output root.

The same checks serve the CLI and the flows; only the spelling of a parameter differs. A `Spelling`
names a parameter as its user wrote it: `--shard-size` on the command line, `shard_size` in a flow
or deployment run, so a deployment user is never told about a CLI flag.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, replace
from pathlib import Path

from autoexplain import defaults
from autoexplain.errors import LayerMismatch, UserError
from autoexplain.model_config import Shape, read_shape
from autoexplain.server_probe import probe_scheduler, probe_server
from autoexplain.sources import MLP
from autoexplain.spelling import Spelling, cli_flag, flow_name  # noqa: F401 - callers spell through preflight too
from autoexplain.storage import content_key



# Set by the orchestration while it checks a run whose process ends with it (a deployment's run
# process, started by a worker for that run alone): memory:// outputs would vanish with it.
PROCESS_ENDS_WITH_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("process_ends_with_run", default=False)


def respelled(error: UserError, spell: Spelling) -> UserError:
    """A run's error about one of its parameters ("parameter NAME: ..."), or whose fix names one (a
    corpus line without the text field), found after these checks (a dask scheduler gone since), in
    `spell`'s words: the CLI names the flag its user typed."""
    import re

    head, sep, rest = error.problem.partition(": ")
    name = head.removeprefix("parameter ")
    problem = f"{spell(name)}: {rest}" if sep and flow_name(name) == head else error.problem
    fix = re.sub(r"\bparameter (\w+)", lambda m: spell(m[1]), error.fix or "") or None
    return error if (problem, fix) == (error.problem, error.fix) else UserError(problem, fix)


def refuse(spell: Spelling, name: str, problem: str, fix: str) -> UserError:
    """The error for parameter `name`, spelled as the caller's users know it (flag or flow parameter)."""
    return UserError(f"{spell(name)}: {problem}", fix)


def for_parameter(spell: Spelling, name: str, e: UserError) -> UserError:
    """`e` said of the parameter `name` (see `refuse`)."""
    return refuse(spell, name, e.problem, e.fix or "")


def at_least(spell: Spelling, name: str, value: int, low: int) -> None:
    if value is None or value < low:
        raise refuse(spell, name, f"must be at least {low}, got {value}", f"pass {spell(name).split()[-1]} >= {low}")


def model_shape(model: str, spell: Spelling = flow_name, name: str = "model") -> Shape:
    """Layers and units of a subject from its config (`model_config.read_shape`), without loading weights."""
    try:
        return read_shape(model)
    except UserError as e:
        raise for_parameter(spell, name, e) from None


def check_layer(shape: Shape, layer: int, spell: Spelling = flow_name, name: str = "layer") -> None:
    if not 0 <= layer < shape.n_layers:
        raise refuse(spell, name, f"layer {layer} is out of range for {shape.name}, which has layers 0..{shape.n_layers - 1}",
                    f"pass a layer from 0 to {shape.n_layers - 1}")


def check_window(shape: Shape, window_len: int, spell: Spelling = flow_name, name: str = "window_len") -> None:
    """A window the model can read in one pass: past its position embeddings a forward pass fails
    (GPT-2's learned ones index out of range) after the weights have loaded, and a flow retries it."""
    if shape.n_positions and window_len > shape.n_positions:
        raise UserError(f"{spell(name)} {window_len} is longer than the model's context of {shape.n_positions} positions",
                        f"give {spell(name).split()[-1]} {shape.n_positions} or less")


def check_units(shape: Shape, units: str | None, spell: Spelling = flow_name, name: str = "units") -> list[int] | None:
    from autoexplain.indices import parse_units

    try:
        return parse_units(units, shape.n_units)
    except UserError as e:
        raise for_parameter(spell, name, e) from None


# ---- LLMs, explainers and simulators -------------------------------------------------------------

def _parsed(parse, spec, spell: Spelling, name: str):
    """The registry's parse of a spec, its error spelt with the parameter's name."""
    try:
        return parse(spec)
    except UserError as e:
        raise for_parameter(spell, name, e) from None


def check_llm(spec: str, spell: Spelling, name: str, needs_echo: bool = False) -> None:
    """The spec (through the registry's parser), then what it names: a local model's config, or
    the server (its key, its model, and its prompt logprobs when `needs_echo`)."""
    import os

    from autoexplain import registry
    from autoexplain.llm import KEY_ENV, OPENAI_URL

    p = _parsed(registry.parse_llm, spec.strip(), spell, name)
    if p.kind == "local":
        if p.model:
            model_shape(p.model, spell, name)
        return
    from autoexplain import prices

    prices.table()  # a server LLM is priced: a broken $AUTOEXPLAIN_PRICES file stops the run now, not after recording
    url = p.url or OPENAI_URL
    key = os.environ.get(p.key_env)
    if url == OPENAI_URL and not key:
        raise refuse(spell, name, f"${p.key_env} is not set, and {url} needs an API key",
                    f"export {p.key_env}=..., or use a local server: 'openai:MODEL@http://127.0.0.1:8000/v1'")
    if p.key_env != KEY_ENV and not key:  # named in the spec: the user means it to be there
        raise refuse(spell, name, f"${p.key_env} is not set, and '{spec}' names it as the key of {url}",
                    f"export {p.key_env}=... (that server's API key)")
    try:
        probe_server(url, p.model, key, needs_echo, p.key_env)
    except UserError as e:
        raise for_parameter(spell, name, e) from None


def check_limits(concurrency: int | None, rpm: float | None, spell: Spelling = flow_name,
                 tpm: float | None = None, retries: int | None = None, timeout: float | None = None) -> None:
    """The LLM concurrency (requests in flight), requests- and tokens-per-minute limits, retries and
    timeout (seconds) per request; None: the default."""
    if concurrency is not None:
        at_least(spell, "concurrency", concurrency, 1)
    if retries is not None:
        at_least(spell, "retries", retries, 0)
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise refuse(spell, "timeout", f"must be more than 0 seconds, got {timeout}",
                    f"pass {spell('timeout').split()[-1]} SECONDS > 0, or leave it out for 120 s")
    for name, value, what in (("rpm", rpm, "requests"), ("tpm", tpm, "tokens")):
        if value is not None and not value > 0:
            raise refuse(spell, name, f"must be more than 0 {what} per minute, got {value}",
                        f"pass {spell(name).split()[-1]} > 0, or leave it out for no limit")


def check_dask(address: str | None, spell: Spelling = flow_name, name: str = "dask", budget: str | None = None) -> None:
    """The dask scheduler that runs the tasks (None: threads in the flow's process): one connection.
    Not with a `budget`: a budget is kept by each process that asks the LLMs (`autoexplain.budget`),
    and every dask worker process would keep its own, so the run could spend it once per worker."""
    if address and budget is not None and str(budget).strip():
        raise refuse(spell, "budget", f"cannot be kept on dask workers (each worker process would keep a budget "
                     f"of its own, so the run could spend {budget} once per worker)",
                     f"leave {spell('budget').split()[-1]} out to run on dask ({spell('rpm').split()[-1]} and "
                     f"{spell('tpm').split()[-1]} still pace each worker), or leave {spell(name).split()[-1]} out "
                     "to keep the budget")
    if address:
        try:
            probe_scheduler(address)
        except UserError as e:
            raise for_parameter(spell, name, e) from None


def check_budget(budget: str | None, spell: Spelling = flow_name, *, explainer: str | None = None,
                 simulator: str | None = None, scorers: str | None = None):
    """The run's spending limit (`budget.parse`; None: no limit). A limit in dollars needs a price for
    every server model the run asks, else it could not be kept."""
    from autoexplain import budget as budgets
    from autoexplain import prices, registry

    limit = _parsed(budgets.parse, budget, spell, "budget")
    if limit is None or limit.unit != "$":
        return limit
    specs = [(explainer, registry.parse_explainer), (simulator, registry.parse_simulator)]
    llms = {parse(spec).llm for spec, parse in specs if spec is not None}
    llms |= {p.llm for p in registry.parse_scorers(scorers)} if scorers else set()
    for llm in llms - {None}:
        p = registry.parse_llm(llm)
        if p.kind != "local" and prices.price_of(p.model) is None:
            raise refuse(spell, "budget", f"is in dollars, but the model '{p.model}' has no price in {prices.source()}",
                        f"add it to a table named by ${prices.OVERRIDE_ENV}, or give the budget in tokens ('2M tokens')")
    return limit


def check_explainer(spec: str | None, spell: Spelling = flow_name, name: str = "explainer") -> None:
    from autoexplain import registry

    p = _parsed(registry.parse_explainer, spec, spell, name)
    if p.llm is not None:
        check_llm(p.llm, spell, name)


def check_simulator(spec: str | None, spell: Spelling = flow_name, name: str = "simulator") -> None:
    from autoexplain import registry

    p = _parsed(registry.parse_simulator, spec, spell, name)
    if p.llm is not None:
        check_llm(p.llm, spell, name, needs_echo=p.cls.needs_prompt_logprobs)


def check_scorers(specs: str | None, spell: Spelling = flow_name, name: str = "scorers") -> list[str]:
    """A comma-separated scorer list ('simulation,detection,fuzzing'): each spec, and the server or
    local model its LLM names. Returns the specs."""
    from autoexplain import registry

    parsed = _parsed(registry.parse_scorers, specs, spell, name)
    for p in parsed:
        if p.llm is not None:
            check_llm(p.llm, spell, name)
    return [p.spec for p in parsed]


# ---- inputs and outputs --------------------------------------------------------------------------

def check_corpus(corpus: str, spell: Spelling = flow_name, name: str = "corpus", text_field: str = "text") -> None:
    """The corpus is there, and each file starts as its reading expects (`corpus.check_head`)."""
    from autoexplain.corpus import TEXT_SUFFIXES, check_head

    if corpus == defaults.CORPUS or corpus.startswith("hf:"):
        return
    path = Path(corpus).expanduser()
    if not path.exists():
        raise refuse(spell, name, f"corpus {path} does not exist", "pass 'default', a text file or folder, or hf:NAME")
    if path.is_file() and path.suffix not in TEXT_SUFFIXES:
        raise refuse(spell, name, f"unsupported corpus file type '{path.suffix}'", f"use one of {', '.join(TEXT_SUFFIXES)}")
    check_head(corpus, text_field, spell)


def check_out(out: str, spell: Spelling = flow_name, name: str = "out") -> None:
    """A URL must answer; a folder must be a folder, or creatable under a writable one."""
    import os

    from autoexplain import remote

    if remote.is_url(out):
        _outlives_the_command(out, spell, name)
        try:
            remote.check(out)
        except UserError as e:
            raise for_parameter(spell, name, e) from None
        return
    path = Path(out).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise refuse(spell, name, f"cannot write under {path}: {probe} is a file", "pass a folder path")
    if not os.access(probe, os.W_OK | os.X_OK) or not _can_make_folder_in(probe):
        raise refuse(spell, name, f"cannot write under {path}: {probe} is not writable", "pass a writable folder")


def _can_make_folder_in(folder: Path) -> bool:
    """Whether a folder can be made here, tried for real and removed: as root, `os.access` says yes
    to read-only mounts and to /proc."""
    import os
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".autoexplain-probe-", dir=folder))
    except OSError:
        return False
    return True


def check_root(out: str, spell: Spelling = flow_name, name: str = "out") -> None:
    """An output root that a command only reads: a URL must be there (nothing is made for a
    mistyped one); a folder is looked for by the command itself."""
    from autoexplain import remote

    if remote.is_url(out):
        _outlives_the_command(out, spell, name)
        try:
            remote.open_root(out, create=False)
        except UserError as e:
            raise for_parameter(spell, name, e) from None


def _outlives_the_command(url: str, spell: Spelling, name: str) -> None:
    """A command line's process ends with its command, and a URL kept in its memory with it: nothing
    written there would remain; so does a deployment run's process (a worker starts one per run).
    (A flow called in a Python process may use one while it lives.)"""
    from autoexplain import remote

    if remote.in_process(url) and (spell is cli_flag or PROCESS_ENDS_WITH_RUN.get()):
        raise refuse(spell, name, f"{url} lives in this process's memory: what is written there vanishes when "
                    + ("the command exits" if spell is cli_flag else "the run's process exits"), "pass a folder or a persistent URL (file:///path, s3://bucket/run, ...)")


def check_results(results: str | None, spell: Spelling = flow_name) -> None:
    """Where Prefect keeps the task results (None: its own storage): checked as an output folder, so
    a file there is one line before any work, not a failed commit after every task."""
    if results is not None:
        check_out(results, spell, "results")


def check_revisions(revisions: dict[str, str] | None, units: list[int] | None, spell: Spelling = flow_name,
                    name: str = "revisions", polarities: tuple[int, ...] = (1, -1)) -> dict[tuple[int, int], str]:
    """'UNIT' or 'UNIT:POLARITY' -> text, each for a unit and polarity this run explains (a coder's
    latents have one polarity)."""
    parsed: dict[tuple[int, int], str] = {}
    for key, text in (revisions or {}).items():
        unit, _, pol = str(key).partition(":")
        try:
            unit_i, pol_i = int(unit), int(pol or 1)
        except ValueError:
            unit_i, pol_i = -1, 0
        if unit_i < 0 or pol_i not in (1, -1):
            raise refuse(spell, name, f"cannot read the revision key '{key}'", "write 'UNIT' or 'UNIT:+1' / 'UNIT:-1', e.g. '12:-1'")
        if units is not None and unit_i not in units:
            raise refuse(spell, name, f"unit {unit_i} is not among the units this run explains",
                        "revise a unit inside the run's units")
        if pol_i not in polarities:
            raise refuse(spell, name, f"'{key}': this run's units have polarity {polarities[0]:+d} only",
                        f"write '{unit_i}' or '{unit_i}:{polarities[0]:+d}'")
        if not isinstance(text, str) or not text.strip():
            raise refuse(spell, name, f"the revision of '{key}' is empty", "give the explanation's new text")
        parsed[(unit_i, pol_i)] = text.strip()
    return parsed


def check_same_coder(out: str, layer: int, source, source_id: str, spell: Spelling = flow_name) -> None:
    """Two coders of one kind at one layer share a run pointer and pages: one run must not silently
    replace the other's (`source_coder.other_coder`)."""
    from autoexplain.source_coder import other_coder
    from autoexplain.storage import layer_name

    theirs = other_coder(out, layer, source, source_id)
    if theirs:
        raise refuse(spell, "source", f"{out} already holds layer {layer}'s {source.kind} latents of another coder "
                    f"({theirs}): this run would replace its run pointer and pages", "explain this coder into "
                    f"another output root, or remove runs/{layer_name(layer, source.kind)}.json there to replace that run")


def check_source(source: str | None, model: str, layer: int | None, spell: Spelling = flow_name,
                 name: str = "source", layer_name: str = "layer"):
    """The unit source a run reads (`source_coder.open_unit_source`), its coder read and checked
    against the subject's config: a wrong path, format, hook point or width is one line here, and a
    layer the coder does not read is one about `layer_name`, the command's own layer parameter."""
    from autoexplain.source_coder import open_unit_source

    try:
        return open_unit_source(source, model, layer)
    except LayerMismatch as e:
        raise refuse(spell, layer_name, e.problem, e.fix_for(spell(layer_name).split()[-1])) from None
    except UserError as e:
        raise for_parameter(spell, name, e) from None


def source_kind(source: str | None, spell: Spelling = flow_name, name: str = "source") -> tuple[str, int | None]:
    """The kind of units a source value names and the layer its coder reads (None without a coder:
    `source_coder.kind_and_layer`), or one line saying why not."""
    from autoexplain.source_coder import kind_and_layer

    try:
        return kind_and_layer(source)
    except UserError as e:
        raise for_parameter(spell, name, e) from None


@dataclass(frozen=True)
class LayerPlan:
    shape: Shape
    units: list[int] | None  # None: all units (the config did not say how many)
    revisions: dict[tuple[int, int], str]
    budget: object = None  # a budget.Budget, or None: no limit
    layer: int = defaults.LAYER
    source: object = None  # a sources.UnitSource
    source_id: str = "mlp"  # what the recording depends on of the source (a task's cache key)


def check_recording(p: dict, spell: Spelling = flow_name) -> None:
    """A recording's sizes (parameters by name; those missing take their defaults): positive, enough
    windows in the tokens asked for to keep the exemplars, and a reservoir that holds the random ones.
    Found here, not by the recording's data contract after the whole pass."""
    for name, low in (("tokens", 1), ("window_len", 2), ("top_k", 1), ("n_random", 0), ("quantile_per_bin", 0),
                      ("reservoir", 1), ("batch_size", 1), ("seed", 0)):
        if name in p:
            at_least(spell, name, p[name], low)
    window_len, top_k, n_random = p.get("window_len", 64), p.get("top_k", 40), p.get("n_random", 30)
    if "tokens" in p and p["tokens"] // window_len < top_k + n_random:
        raise refuse(spell, "tokens", f"{p['tokens']} tokens make {p['tokens'] // window_len} windows of {window_len}, "
                    f"fewer than the {top_k} top + {n_random} random exemplars kept per unit",
                    f"pass at least {(top_k + n_random) * window_len} tokens, or fewer exemplars")
    if p.get("reservoir", n_random) < n_random:
        raise refuse(spell, "reservoir", f"a sample of {p['reservoir']} windows cannot hold the {n_random} random "
                    "exemplars kept per unit", f"pass {spell('reservoir').split()[-1]} >= {n_random}, or fewer random exemplars")


def explain_layer(p: dict, spell: Spelling = flow_name, layer_name: str = "layer") -> LayerPlan:
    """Every parameter of an explain-layer run (flow parameters by name; missing ones are skipped).
    `layer_name`: the parameter a caller's users give the layer by (explain-model's `layers`)."""
    defaults.check_environment()
    for name, low in (("k", 1), ("shard_size", 1), ("n_boot", 1), ("layer", 0)):
        if name in p and (name != "layer" or p[name] is not None):
            at_least(spell, name, p[name], low)
    check_recording(p, spell)
    check_out(p.get("out", "out"), spell)
    if p.get("site") not in (None, "none"):
        check_out(p["site"], spell, "site")
    check_results(p.get("results"), spell)
    check_corpus(p.get("corpus", defaults.CORPUS), spell, text_field=p.get("text_field", "text"))
    model = p.get("model", defaults.SUBJECT)
    shape = model_shape(model, spell)
    check_window(shape, p.get("window_len", 64), spell)
    source = check_source(p.get("source"), model, p.get("layer"), spell, layer_name=layer_name)
    layer = p.get("layer")
    if layer is None:
        layer = getattr(source, "layer", shape.middle_layer)
    check_layer(shape, layer, spell)
    source_id = content_key(source.identity())
    check_same_coder(p.get("out", "out"), layer, source, source_id, spell)
    if source.kind != MLP.kind:
        shape = replace(shape, n_units=source.n_units(None))
    units = check_units(shape, p.get("units"), spell)
    if units == []:
        raise refuse(spell, "units", "selects no unit", "pass a range like 0-99")
    revisions = check_revisions(p.get("revisions"), units, spell, polarities=source.polarities)
    check_limits(p.get("concurrency"), p.get("rpm"), spell, p.get("tpm"), p.get("retries"), p.get("timeout"))
    check_dask(p.get("dask"), spell, budget=p.get("budget"))
    check_explainer(p.get("explainer"), spell)
    check_simulator(p.get("simulator"), spell)
    check_scorers(p.get("scorers"), spell)
    limit = check_budget(p.get("budget"), spell, explainer=p.get("explainer"), simulator=p.get("simulator"),
                         scorers=p.get("scorers"))
    return LayerPlan(shape, units, revisions, limit, layer, source, source_id)
