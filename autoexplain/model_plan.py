"""Fail before working, for a whole model: every parameter of an explain-model run, checked up front.

A model run is a set of parts, one per (unit source, layer): the MLP neurons of every chosen layer,
and each sparse coder's latents at its own layer. Each source is checked exactly as an explain-layer
run of it would be (`preflight.explain_layer`, on its first layer; the other layers only need their
range checked), so the two commands can never disagree about what a valid parameter is. A sparsify
run's folder, which holds a coder per hookpoint, is a source per hookpoint folder the layers pick.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from autoexplain import preflight
from autoexplain.errors import UserError
from autoexplain.indices import parse_indices
from autoexplain.sources import MLP


@dataclass
class ModelPlan:
    # Per source spec, as given, its parts (one per layer): a source is recorded once for all of them.
    sources: list[tuple[str, list[preflight.LayerPlan]]]
    budget: object = None


def parse_layers(spec, n_layers: int | None, spell: preflight.Spelling = preflight.flow_name) -> list[int]:
    """'3,15', '0-29', a list of ints, or 'all' (every layer), checked against a model of `n_layers`
    (None: a range that no model is known for, as publish's). Callers give their own default for no
    spec: every command that takes layers reads them here, so they all read and refuse alike."""
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(x) for x in spec)
    if str(spec).strip() == "all" and n_layers is not None:
        return list(range(n_layers))
    try:
        # no spec, or 'all' without a model's size, names no layer (refused below)
        layers = [] if spec is None or str(spec).strip() in ("", "all") else parse_indices(spec, None, "layer", "10-12")
    except UserError as e:
        raise preflight.for_parameter(spell, "layers", e) from None
    if not layers:
        raise UserError(f"{spell('layers')}: '{spec}' names no layer", "pass a layer, a list like 3,7, a range like 10-12, or 'all'")
    bad = [x for x in layers if n_layers is not None and x >= n_layers]
    if bad:
        raise UserError(f"{spell('layers')}: layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}",
                        f"pass layers from 0 to {n_layers - 1}, e.g. 0-{n_layers - 1}")
    return layers


def coder_folders(spec: str, asked: list[int] | None, spell: preflight.Spelling) -> list[str]:
    """The source specs a `sources` entry stands for: a sparsify run's folder ('sae:RUN') is its
    hookpoint folders ('sae:RUN/layers.3') at the layers asked (all without layers); any other
    spec is itself (checked later, as explain-layer checks it). A coder's path comes back absolute,
    as the run pointers keep it (`sae.absolute_source`)."""
    from autoexplain.sae import absolute_source, parse_source
    from autoexplain.sae_formats import detect, sparsify_children

    try:
        source = parse_source(spec)
        if source.path is None or not source.path.is_dir() or detect(source.path) != "sparsify-parent":
            return [absolute_source(spec)]
    except UserError:  # not a coder folder: checked later, as explain-layer checks it
        return [spec]
    children = sparsify_children(source.path)
    # A layer asked for that the run has no coder at would be a hole in the results no line reports.
    lacking = [layer for layer in asked or [] if layer not in {at for at, _ in children}]
    if lacking:
        have = sorted(at for at, _ in children if at is not None)
        raise UserError(f"{spell('layers')}: {source} holds no coder for layer {', '.join(map(str, lacking))} "
                        f"(it has {', '.join(d.name for _, d in children)})",
                        f"pick layers it has ({', '.join(map(str, have)) or 'none'}), or leave {spell('layers').split()[-1]} out")
    picked = [f"{source.kind}:{d}" for layer, d in children if layer is not None and (asked is None or layer in asked)]
    if not picked:
        raise UserError(f"{spell('sources')}: {source} holds no coder at a layer autoexplain can read "
                        f"(it has {', '.join(d.name for _, d in children)})", "point at a folder of coders named layers.L")
    return picked


def explain_model(p: dict, spell: preflight.Spelling = preflight.flow_name) -> ModelPlan:
    """`p`: explain-model parameters by name (`layers`, `sources`, and explain-layer's others)."""
    sources = list(p.get("sources") or [MLP.kind])
    if len(set(sources)) != len(sources):
        raise UserError(f"{spell('sources')}: {sources} names a source twice", "name each source once")
    shape = preflight.model_shape(p.get("model", "smollm2"), spell)
    asked = None if p.get("layers") in (None, "all") else parse_layers(p["layers"], shape.n_layers, spell)
    sources = [one for spec in sources for one in coder_folders(spec, asked, spell)]
    preflight.check_dask(p.get("dask"), spell, budget=p.get("budget"))  # once, not once per source
    common = {k: v for k, v in p.items() if k not in ("layers", "sources", "revisions", "dask")}
    groups: list[tuple[str, list[preflight.LayerPlan]]] = []
    for spec in sources:
        if spec == MLP.kind:
            # Every check but the layer's is the same for each layer: made once, on the first.
            layers = asked if asked is not None else list(range(shape.n_layers))
            first = preflight.explain_layer({**common, "layer": layers[0], "source": spec}, spell)
            for layer in layers[1:]:
                preflight.check_layer(shape, layer, spell, name="layers")
            groups.append((spec, [replace(first, layer=layer) for layer in layers]))
            continue
        # One layer asked is the coder's: checked against it, or the layer of one that does not say.
        one = asked[0] if asked is not None and len(asked) == 1 else None
        part = preflight.explain_layer({**common, "layer": one, "source": spec}, spell, layer_name="layers")
        if asked is not None and part.layer not in asked:
            raise UserError(f"{spell('sources')}: {spec} reads layer {part.layer}, which layers {asked} leaves out",
                            f"add {part.layer} to the layers, or leave the layers out")
        groups.append((spec, [part]))
    unread = [layer for layer in asked or [] if all(part.layer != layer for _, parts in groups for part in parts)]
    if unread:
        raise UserError(f"{spell('layers')}: no source reads layer {', '.join(map(str, unread))} "
                        f"({'; '.join(f'{spec} reads layer {parts[0].layer}' for spec, parts in groups)})",
                        f"leave {'it' if len(unread) == 1 else 'them'} out of {spell('layers').split()[-1]}, "
                        "or add a source that reads it (mlp reads every layer)")
    pages = [(part.layer, part.source.kind) for _, parts in groups for part in parts]
    if len(set(pages)) != len(pages):
        raise UserError(f"{spell('sources')}: two coders of the same kind at one layer would share pages and run pointers",
                        "explain them in separate runs (explain-layer --source ... --out ...)")
    return ModelPlan(groups, groups[0][1][0].budget)
