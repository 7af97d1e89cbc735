"""Finding the finished run that rescore and revise start from, under an output root.

Part of the preflight: a run that is not there, or whose outputs are not whole, is one line naming
the parameter to set or the file to delete, before any work.
"""

from __future__ import annotations

from pathlib import Path

from autoexplain import defaults
from autoexplain.errors import UserError
from autoexplain.preflight import Spelling, check_root, flow_name, for_parameter, refuse, source_kind
from autoexplain.sources import MLP


def run_of(out: str, layer: int | None, source: str | None, spell: Spelling = flow_name) -> dict:
    """`find_run` for a source as given ('mlp', 'sae:PATH' or a kind) and a layer or None: then the
    coder's own layer, else the one layer holding a run of those units (a model's middle layer
    is not known here), else the default layer."""
    from autoexplain import remote
    from autoexplain.storage import open_root, run_layers

    kind, own = source_kind(source, spell)
    if layer is not None and own is not None and layer != own:  # a coder reads one layer: no run of another
        raise refuse(spell, "layer", f"layer {layer} disagrees with the coder {source}, which reads layer {own}",
                     f"set {spell('layer').split()[-1]} to {own}, or leave it out")
    if layer is None and own is None and (remote.is_url(out) or Path(out).is_dir()):
        check_root(out, spell)
        have = run_layers(open_root(out), kind)
        own = have[0] if len(have) == 1 else None
    return find_run(out, defaults.LAYER if layer is None and own is None else own if layer is None else layer, spell, kind)


def find_run(out: str, layer: int, spell: Spelling = flow_name, kind: str = MLP.kind) -> dict:
    """The latest finished run of `layer`'s units of source `kind` under the output root `out` (its
    pointer, `storage.run_file`) with the outputs rescore and revise read here and whole (the previous
    scores too: they compare), or a UserError naming the parameter to set or the file that is not."""
    from autoexplain.storage import open_root, read_run, require_outputs, run_file, run_layers, run_sources

    check_root(out, spell)
    root = open_root(out)
    run = read_run(root, layer, kind)
    if run is not None:
        require_outputs(run, ("records", "explanations", "scores"))
        if not run.get("scores"):
            from autoexplain.layer import dead_of_run
            from autoexplain.summary import dead_line

            asked = dead_of_run(run)
            raise UserError(f"{out}'s run of layer {layer}'s {kind} units has no explained units: "
                            f"{dead_line(len(asked), asked)}, so there is nothing to simulate or score again",
                            "explain other units, or record more tokens, with explain-layer first")
        return run
    others = [k for L, k in run_sources(root) if L == layer and k != kind]
    if others:
        raise refuse(spell, "source", f"{out} holds no finished run of layer {layer}'s {kind} units "
                    f"(it has {', '.join(others)})", f"set {spell('source').split()[-1]} to one of those")
    have = run_layers(root, kind)
    if have:
        raise refuse(spell, "layer", f"{out} holds no finished explain-layer run of layer {layer} "
                    f"(it has layers {', '.join(map(str, have))})", f"set {spell('layer').split()[-1]} to one of those")
    elsewhere = run_sources(root)  # only other sources' units, at other layers
    if elsewhere:
        raise refuse(spell, "source", f"{out} holds no finished run of layer {layer}'s {kind} units (it has "
                    + ", ".join(f"layer {L}'s {k}" for L, k in elsewhere) + ")",
                    f"set {spell('source').split()[-1]} and {spell('layer').split()[-1]} to one of those")
    raise refuse(spell, "out", f"{out} holds no finished explain-layer run (looked for "
                f"{run_file(root, layer, kind).relative_to(root)})",
                f"set {spell('out').split()[-1]} to the output root of an explain-layer run, or run explain-layer there first")


def rerun_of(out: str, layer: int | None, source: str | None, scorers: str | None,
             spell: Spelling = flow_name) -> dict:
    """`run_of`, and what its re-scoring with `scorers` needs beside it (`check_hard_negatives`)."""
    run = run_of(out, layer, source, spell)
    check_hard_negatives(run, scorers, source, spell)
    return run


def check_hard_negatives(run: dict, scorers: str | None, source: str | None, spell: Spelling = flow_name) -> None:
    """A scorer that asks about hard negatives runs the run's model again, with a coder's run its
    coder: a model changed since the recording, or a coder moved or changed, is one line here, not a
    failure after everything was simulated again (paid, with an LLM simulator). A coder is looked
    for where `source` says it is now; records not here (a URL root not pulled yet) are left to
    the task that pulls them."""
    from autoexplain.classify_stage import takes_hard_negatives
    from autoexplain.negatives import check_model
    from autoexplain.registry import parse_scorers
    from autoexplain.source_coder import recorded_source

    model, records = run["params"].get("model"), Path(run["records"].get("path", ""))
    if not model or not records.is_dir() or not any(takes_hard_negatives(p.spec) for p in parse_scorers(scorers)):
        return
    try:
        check_model(records, model)
    except UserError as e:
        if run.get("flow") != "import":
            raise
        # a dataset names its model without its place (`publish.public_model`)
        raise UserError(f"the dataset's model '{model}' is not here to run again ({e.problem})",
                        "import the dataset again with --model, where the model is on this machine") from None
    try:
        recorded_source(records, model, run["params"]["layer"], source)
    except UserError as e:
        raise for_parameter(spell, "source", e) from None
