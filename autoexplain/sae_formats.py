"""Readers for the checkpoint formats users bring, each into an `autoexplain.sae_coder.SparseCoder`.

- SAELens: `cfg.json` + `sae_weights.safetensors`. 6.x configs keep the hook under `metadata` and
  name the architecture; earlier ones are flat (`hook_name` or `hook_point`, `activation_fn` or
  `activation_fn_str` with `activation_fn_kwargs.k` for TopK, boolean `normalize_activations`).
- EleutherAI sparsify: one folder per hookpoint (`layers.10`, `layers.5.mlp`) with `cfg.json` +
  `sae.safetensors`, the encoder stored as an `nn.Linear` ([num_latents, d_in]).
- GemmaScope: `params.npz`, JumpReLU, its place in the model only in the folder names
  (`layer_12/width_16k/...` under a `...-res`, `...-mlp` or `...-transcoders` release).

The format is told by the files alone; a folder that matches none gets one line naming what was
looked for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from autoexplain.errors import LayerMismatch, UserError
from autoexplain.sae_coder import HookPoint, SparseCoder, parse_tl_hook

SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
SPARSIFY_FILES = ("cfg.json", "sae.safetensors")
GEMMASCOPE_FILE = "params.npz"

# SAELens 6.x architecture names -> (our architecture, is a transcoder)
_SAELENS_ARCH = {
    "standard": ("standard", False), "topk": ("topk", False), "jumprelu": ("jumprelu", False),
    "gated": ("gated", False), "transcoder": ("standard", True), "skip_transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", True),
}
# sparsify names hookpoints by module path: `layers.L` is a decoder layer, `.mlp` its MLP.
_SPARSIFY_HOOK = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)(\.mlp)?$")


def _json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}", "the SAE config must be a JSON object") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object", "the SAE config must be a JSON object")
    return cfg


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0][:160]}", "the weights file is damaged") from None


def _require(tensors: dict, names: tuple[str, ...], where: Path, what: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)} (has {', '.join(sorted(tensors)) or 'nothing'})",
                        f"a {what} checkpoint needs {', '.join(names)}")


def detect(path: Path) -> str:
    """'saelens', 'sparsify', 'sparsify-parent' or 'gemmascope', from the files present."""
    if not path.exists():
        raise UserError(f"SAE path {path} does not exist", "give a folder holding an SAE, or a GemmaScope params.npz")
    if path.is_file():
        if path.name.endswith(".npz"):
            return "gemmascope"
        raise UserError(f"{path} is a file, not an SAE folder", "give the folder holding cfg.json, or a GemmaScope params.npz")
    if all((path / f).is_file() for f in SAELENS_FILES):
        return "saelens"
    if all((path / f).is_file() for f in SPARSIFY_FILES):
        return "sparsify"
    if (path / GEMMASCOPE_FILE).is_file():
        return "gemmascope"
    if any((d / SPARSIFY_FILES[1]).is_file() for d in path.iterdir() if d.is_dir()):
        return "sparsify-parent"
    raise UserError(
        f"{path} holds no SAE: none of {' + '.join(SAELENS_FILES)} (SAELens), {' + '.join(SPARSIFY_FILES)} "
        f"(sparsify, also one level down), {GEMMASCOPE_FILE} (GemmaScope)",
        "point at the folder that holds the SAE's files",
    )


def read_saelens(folder: Path) -> SparseCoder:
    cfg = _json(folder / "cfg.json")
    meta = cfg.get("metadata")
    if isinstance(meta, dict):  # 6.x
        hook_name = meta.get("hook_name") or cfg.get("hook_name")
        arch_name = cfg.get("architecture", "standard")
        k = cfg.get("k")
    else:  # before 6.0: one flat dict
        hook_name = cfg.get("hook_name") or cfg.get("hook_point")
        activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
        arch_name = cfg.get("architecture", "standard")
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if activation == "topk" and k is not None:
            arch_name = "topk"
        elif activation != "relu":
            raise UserError(f"{folder / 'cfg.json'}: unknown architecture (activation_fn '{activation}')",
                            "autoexplain reads relu and topk activations of pre-6 SAELens configs")
    if arch_name not in _SAELENS_ARCH:
        raise UserError(f"{folder / 'cfg.json'}: unknown architecture '{arch_name}'",
                        f"autoexplain reads SAELens architectures {', '.join(_SAELENS_ARCH)}")
    architecture, transcoder = _SAELENS_ARCH[arch_name]
    if not hook_name:
        raise UserError(f"{folder / 'cfg.json'} names no hook_name", "add the TransformerLens hook name it was trained on")
    hook = parse_tl_hook(hook_name, str(folder / "cfg.json"))
    if not isinstance(meta, dict) and cfg.get("hook_layer") not in (None, hook.layer):
        raise UserError(f"{folder / 'cfg.json'}: hook_layer {cfg['hook_layer']} disagrees with hook_name '{hook_name}'",
                        "fix one of them")
    normalize = cfg.get("normalize_activations")
    if isinstance(normalize, bool) or normalize is None:  # the pre-6 boolean
        normalize = "expected_average_only_in" if normalize else "none"

    t = _safetensors(folder / "sae_weights.safetensors")
    needed = {"gated": ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"),
              "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    _require(t, needed.get(architecture, ("W_enc", "b_enc", "W_dec", "b_dec")), folder / "sae_weights.safetensors",
             f"SAELens {arch_name}")
    for field, dim in (("d_in", 0), ("d_sae", 1)):
        if cfg.get(field) is not None and int(cfg[field]) != t["W_enc"].shape[dim]:
            raise UserError(f"{folder}: cfg.json says {field} = {cfg[field]} but W_enc is {list(t['W_enc'].shape)}",
                            "the config and the weights come from different SAEs")
    return SparseCoder(
        str(folder), "saelens", architecture, transcoder, hook, t["W_enc"],
        t.get("b_enc", torch.zeros(t["W_enc"].shape[1])), t["W_dec"], t["b_dec"],
        # SAELens transcoders never subtract b_dec: it has the output's width.
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder,
        k=int(k) if architecture == "topk" and k is not None else None,
        threshold=t.get("threshold"), b_gate=t.get("b_gate"), b_mag=t.get("b_mag"), r_mag=t.get("r_mag"),
        normalize=normalize, rescale_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        model_name=(meta if isinstance(meta, dict) else {}).get("model_name") or cfg.get("model_name"),
    ).to_float32().check()


def sparsify_hook(name: str, transcoder: bool, where: str) -> HookPoint:
    m = _SPARSIFY_HOOK.match(name)
    if not m:
        raise UserError(f"sparsify hookpoint '{name}' ({where}) is not one autoexplain can read",
                        "use a coder trained on layers.L (the residual stream) or layers.L.mlp")
    # sparsify hooks the named Hugging Face module itself: a transcoder reads its input, an SAE its
    # output. For `layers.L.mlp` that is the MLP module's, before any post-MLP norm (Gemma 2 and 3,
    # OLMo 2) and with the pre-MLP norm's gain, not TransformerLens's hook_mlp_out / ln2.hook_normalized.
    points = {(False, False): "resid_post", (False, True): "mlp_module_out", (True, False): "resid_pre",
              (True, True): "mlp_module_in"}
    return HookPoint(int(m.group(1)), points[(transcoder, bool(m.group(2)))])


def read_sparsify(folder: Path) -> SparseCoder:
    cfg = _json(folder / "cfg.json")
    transcoder = bool(cfg.get("transcode", False))
    hook = sparsify_hook(folder.name, transcoder, str(folder))
    t = _safetensors(folder / "sae.safetensors")
    _require(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder / "sae.safetensors", "sparsify")
    latents, d_in = t["encoder.weight"].shape
    expected = int(cfg.get("num_latents") or 0) or int(cfg.get("d_in", d_in)) * int(cfg.get("expansion_factor", 0))
    if cfg.get("d_in", d_in) != d_in or expected not in (0, latents):
        raise UserError(f"{folder}: cfg.json (d_in {cfg.get('d_in')}, {expected} latents) disagrees with "
                        f"encoder.weight {list(t['encoder.weight'].shape)}", "the config and the weights come from different SAEs")
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise UserError(f"{folder / 'cfg.json'}: unknown architecture (activation '{activation}')",
                        "autoexplain reads sparsify's topk and groupmax")
    if "k" not in cfg:
        raise UserError(f"{folder / 'cfg.json'} has no k", "a sparsify config names k, the active latents per token")
    return SparseCoder(
        str(folder), "sparsify", activation, transcoder, hook, t["encoder.weight"].T, t["encoder.bias"],
        t["W_dec"], t["b_dec"], subtract_b_dec=not transcoder, k=int(cfg["k"]),
    ).to_float32().check()


def sparsify_children(parent: Path) -> list[tuple[int | None, Path]]:
    """(layer, folder) of each hookpoint folder of a sparsify run (layer None: a name it cannot read)."""
    children = sorted(d for d in parent.iterdir() if (d / SPARSIFY_FILES[1]).is_file())
    return [(int(m.group(1)) if (m := _SPARSIFY_HOOK.match(d.name)) else None, d) for d in children]


def sparsify_child(parent: Path, layer: int | None) -> Path:
    """The one hookpoint folder of a sparsify run that `layer` picks."""
    children = sparsify_children(parent)
    names = ", ".join(d.name for _, d in children)
    if layer is None:
        if len(children) == 1:
            return children[0][1]
        raise LayerMismatch(f"{parent} holds sparse coders for several hookpoints ({names})",
                            "point at one of them (sae:PATH/<hookpoint>), or set {layer} to one of their layers")
    picked = [d for at, d in children if at == layer]
    if len(picked) != 1:
        problem = "none" if not picked else "several"
        raise UserError(f"{parent} holds {problem} for layer {layer} (it has {names})", "point at one hookpoint folder")
    return picked[0]


def read_gemmascope(path: Path, transcoder: bool, layer: int | None) -> SparseCoder:
    """`layer` stands in where no `layer_N` folder names it."""
    import numpy as np

    file = path if path.is_file() else path / GEMMASCOPE_FILE
    try:
        with np.load(file) as npz:
            t = {name: torch.from_numpy(np.asarray(npz[name])) for name in npz.files}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file}: {type(e).__name__}", "the params.npz is damaged") from None
    _require(t, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), file, "GemmaScope")
    parts = file.absolute().parts
    layer = next((int(m.group(1)) for p in parts if (m := re.fullmatch(r"layer_(\d+)", p))), layer)
    release = _gemmascope_release(file).split("-")
    if "att" in release:
        raise UserError(f"{file} is an attention-output SAE", "autoexplain reads residual, MLP-output and transcoder coders")
    # GemmaScope's transcoders read the MLP's input as the model computes it (with the norm's
    # gain; circuit-tracer feeds them TransformerLens's mlp.hook_in of an unfolded model), its MLP
    # SAEs what the MLP adds to the stream, after the post-MLP norm (hook_mlp_out).
    point = "mlp_module_in" if transcoder else "mlp_out" if "mlp" in release else "resid_post"
    return SparseCoder(
        str(file), "gemmascope", "jumprelu", transcoder, None if layer is None else HookPoint(layer, point),
        t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], subtract_b_dec=False, threshold=t["threshold"],
    ).to_float32().check()


def _gemmascope_release(path: Path) -> str:
    """The release folder above a params.npz ('gemma-scope-2b-pt-mlp'), also in Hugging Face's cache
    ('models--google--gemma-scope-2b-pt-mlp/snapshots/<revision>/layer_3/...'). The path is taken as
    given, not resolved: in that cache the file is a link into blobs/, which has no folder names."""
    names = (p.split("--")[-1] for p in path.absolute().parts)
    return next((n for n in names if n.startswith("gemma-scope")), "")


def gemmascope_is_transcoder(path: Path) -> bool:
    """GemmaScope transcoders share the SAEs' file layout; only their release folder tells them apart."""
    return any("transcoder" in p for p in path.absolute().parts)  # not resolved: see _gemmascope_release
