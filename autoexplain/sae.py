"""SAE and transcoder latents as units: the `--units` spec (`mlp`, `sae:PATH`, `transcoder:PATH`),
loading the coder whatever its format, and checking it against the subject before any work.

Every check here reads configs and headers only, so a wrong path, a hook point the subject lacks,
a width that does not match, an unknown architecture or a transcoder passed as `sae:` is one line
before the subject model is loaded or a corpus tokenised.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from autoexplain import defaults
from autoexplain.errors import LayerMismatch, UserError
from autoexplain.sae_coder import HookPoint, SparseCoder
from autoexplain.sae_formats import (
    detect, gemmascope_is_transcoder, read_gemmascope, read_saelens, read_sparsify, sparsify_child,
)

KINDS = ("mlp", "sae", "transcoder")


@dataclass(frozen=True)
class SourceSpec:
    """Which units to read: the MLP's neurons, or the latents of a coder stored at `path`."""

    kind: str  # one of KINDS
    path: Path | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_source(text: str) -> SourceSpec:
    """'mlp', 'sae:PATH' or 'transcoder:PATH'. The path is made absolute here, against the directory
    the spec was given in: records, run pointers and the flows' tasks keep the spec, and are read by
    later commands run from anywhere."""
    kind, sep, rest = (text or "").strip().partition(":")
    if kind == "mlp" and not sep:
        return SourceSpec("mlp")
    if kind in ("sae", "transcoder") and rest.strip():
        return SourceSpec(kind, Path(rest.strip()).expanduser().absolute())
    raise UserError(f"cannot read the unit source '{text}'",
                    "write mlp (the MLP neurons), sae:PATH or transcoder:PATH (a local folder)")


def absolute_source(text: str | None) -> str | None:
    """A `--source` value as a run keeps and passes it on: a coder's spec with its path absolute
    (`parse_source`); any other value, a kind or one the checks will refuse, as given."""
    if ":" not in (text or ""):
        return text
    try:
        return str(parse_source(text))
    except UserError:
        return text


def load_coder(spec: SourceSpec, layer: int | None = None) -> SparseCoder:
    """The coder a spec names, its hook point settled: from the checkpoint, which `layer` (when
    given) must agree with, or from `layer` where the checkpoint does not say."""
    if spec.kind not in ("sae", "transcoder") or spec.path is None:
        raise UserError(f"'{spec}' names no sparse coder", "use sae:PATH or transcoder:PATH")
    path, want_transcoder = spec.path, spec.kind == "transcoder"
    fmt = detect(path)
    if fmt == "sparsify-parent":
        path, fmt = sparsify_child(path, layer), "sparsify"
    if fmt == "saelens":
        coder = read_saelens(path)
    elif fmt == "sparsify":
        coder = read_sparsify(path)
    else:
        coder = read_gemmascope(path, want_transcoder or gemmascope_is_transcoder(path), layer)
    if coder.transcoder and not want_transcoder:
        raise UserError(f"{coder.source} is a transcoder, given as sae:", f"pass it as transcoder:{spec.path}")
    if want_transcoder and not coder.transcoder:
        raise UserError(f"{coder.source} is an SAE, given as transcoder:", f"pass it as sae:{spec.path}")
    if coder.hook is None:
        raise LayerMismatch(f"{coder.source} does not say which layer it reads", "set {layer} to the layer it was trained on")
    if layer is not None and layer != coder.hook.layer:
        raise LayerMismatch(f"layer {layer} disagrees with {coder.source}, which reads {coder.hook}",
                            f"set {{layer}} to {coder.hook.layer}, or leave it out")
    return coder


@dataclass(frozen=True)
class ModelDims:
    name: str
    n_layers: int
    d_model: int
    # Every name the subject goes by (as given, its file, its config's names and type): `families`.
    names: tuple[str, ...] = field(default=(), compare=False)


def model_dims(model: str) -> ModelDims:
    """Layers and residual width of a subject, from its config or GGUF header alone."""
    path = Path(defaults.resolve_model(model)).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        names = (model, str(path.absolute()), arch, *(str(fields[k].contents()) for k in ("general.name", "general.basename") if k in fields))
        return ModelDims(model, int(fields[f"{arch}.block_count"].contents()), int(fields[f"{arch}.embedding_length"].contents()),
                         names)
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
    else:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model).to_dict()
        except (OSError, ValueError):
            raise UserError(f"cannot read the config of model '{model}'", "give a local model folder, a .gguf file, or a hub name reachable from here") from None
    cfg = cfg.get("text_config", cfg)
    layers = next((cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if cfg.get(k)), None)
    width = next((cfg[k] for k in ("hidden_size", "n_embd", "d_model") if cfg.get(k)), None)
    if not layers or not width:
        raise UserError(f"the config of '{model}' names no layer count or hidden size", "give a transformer causal LM")
    names = (model, str(path.absolute()), *(str(cfg.get(k) or "") for k in ("_name_or_path", "model_type")), *(cfg.get("architectures") or []))
    return ModelDims(model, int(layers), int(width), names)


# Model families a name can say plainly, as the first word of one of its parts ('SmolLM2-135M',
# 'meta-llama/Llama-3.1-8B', 'gemma-2-2b', 'gpt2-small'). A name with none ('tiny', a local folder)
# says nothing. The subject's own config type counts too (SmolLM2 is a llama), so a coder is only
# ever doubted when no name of the subject shares its family: spellings of one model never are.
FAMILIES = ("smollm", "llama", "gemma", "qwen", "mistral", "mixtral", "pythia", "gpt2", "phi", "olmo", "opt",
            "bloom", "falcon", "deepseek", "granite", "stablelm")
_FAMILY = re.compile(rf"^({'|'.join(FAMILIES)})[0-9.]*$")


def families(*names: str) -> set[str]:
    """The model families `names` say plainly (`FAMILIES`), each name read by its last two parts: a
    hub id's owner and model, a path's file and its folder (not the folders it happens to sit in)."""
    words = (w for name in names for part in str(name).lower().replace("\\", "/").split("/")[-2:]
             for w in re.split(r"[^a-z0-9.]+", part))
    return {m.group(1) for w in words if (m := _FAMILY.match(w.strip(".")))}


_DOUBTED: set[tuple[str, str]] = set()  # (coder, subject) pairs already warned about in this process


def doubt_model(coder: SparseCoder, dims: ModelDims) -> str | None:
    """A warning, said once per coder and subject, when the coder's config names a model of another
    family than every name of the subject; None when they agree or either says nothing. A warning,
    not a refusal: names are spelt many ways, and the shapes have already been checked."""
    theirs, ours = families(coder.model_name or ""), families(*dims.names)
    if not theirs or not ours or theirs & ours or (coder.source, dims.name) in _DOUBTED:
        return None
    _DOUBTED.add((coder.source, dims.name))
    line = (f"warning: {coder.source} was trained on '{coder.model_name}', which names another model than {dims.name}; "
            "its width and layer fit, so it is read anyway: check that it belongs to this model")
    logging.getLogger(__name__).warning(line)
    return line


def check_subject(coder: SparseCoder, dims: ModelDims) -> HookPoint:
    """The coder's hook point, once the subject is known to have it at the coder's width."""
    hook = coder.hook
    if not 0 <= hook.layer < dims.n_layers:
        raise UserError(f"{coder.source} reads {hook}, but {dims.name} has layers 0..{dims.n_layers - 1}",
                        "use a coder trained on this model")
    if coder.d_in != dims.d_model:
        raise UserError(f"{coder.source} has d_in {coder.d_in}, but {dims.name}'s residual width is {dims.d_model}",
                        "use a coder trained on this model")
    doubt_model(coder, dims)
    return hook


def open_source(text: str, model: str, layer: int | None = None) -> tuple[SourceSpec, SparseCoder | None]:
    """Parse a `--units` spec and, for a coder, load and check it against `model`'s config."""
    spec = parse_source(text)
    if spec.kind == "mlp":
        return spec, None
    coder = load_coder(spec, layer)
    check_subject(coder, model_dims(model))
    return spec, coder
