"""Tensors at a sparse coder's hook point (or a layer's MLP units) from Hugging Face's own forward,
read by hooks on the decoder's modules, so no model code is patched. `autoexplain.fused` computes
the same points for Llama-style models; a test holds the two passes equal.

What each point of `sae_coder.POINTS` reads in layer L:

- `resid_pre`, `resid_post`: the input and the output of `layers[L]`.
- `mlp_in`: the residual the MLP reads, normalised WITHOUT the pre-MLP norm's affine part, as
  TransformerLens's `ln2.hook_normalized`: x / rms(x) for RMSNorm (Gemma's `x/rms * (1 + w)` too),
  (x - mean) / std for LayerNorm. TransformerLens's hook sits before the gain (RMSNorm), or the gain
  and bias are folded into the next weights (LayerNorm, `fold_ln=True`), so SAELens transcoders on
  that hook were trained on it. It is computed from the norm's input as the model's norm does:
  in float32, then rounded to the model's dtype.
- `mlp_out`: what the MLP adds to the residual stream, as TransformerLens's `hook_mlp_out`: after
  the post-MLP norm where a model has one (Gemma 2 and 3, OLMo 2), where GemmaScope's MLP SAEs read.
- `mlp_module_in`, `mlp_module_out`: the input and the output of the `layers[L].mlp` module itself,
  where sparsify hooks `layers.L.mlp` (and TransformerLens's `mlp.hook_in`/`hook_out` of a model
  loaded without folding, as circuit-tracer does): the input carries the norm's gain, the output
  comes before any post-MLP norm. Without a post-MLP norm, `mlp_module_out` is `mlp_out`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from autoexplain.errors import UserError

if TYPE_CHECKING:
    from autoexplain.sae_coder import HookPoint

MLP_NAMES = ("mlp", "feed_forward", "ffn")
# Norms applied to the MLP's output before it joins the residual stream.
POST_MLP_NORMS = ("post_feedforward_layernorm",)
# The norm in front of the MLP, by name, first match wins: Gemma 2 and 3 call it
# pre_feedforward_layernorm (their post_attention_layernorm norms the attention's output instead),
# GPT-2 ln_2, Llama, Mistral, Qwen and GPT-NeoX post_attention_layernorm.
PRE_MLP_NORMS = ("pre_feedforward_layernorm", "ln_2", "post_attention_layernorm")
UNITS = "units"  # the capture point of a layer's MLP hidden units: the input of its output projection


class _StopForward(Exception):
    """Raised from the hook that completes a capture: nothing above it is needed."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and n and len(module) == n:
            return list(module)
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}", "use a transformer causal LM")


def _pre_mlp_norm(block: torch.nn.Module, where: str) -> torch.nn.Module | None:
    """The norm whose output the MLP reads; None where the MLP reads the residual as it is."""
    if not hasattr(block, PRE_MLP_NORMS[0]) and any(hasattr(block, n) for n in POST_MLP_NORMS):
        return None  # OLMo 2 norms only outputs: its post_attention_layernorm is not in front of the MLP
    norm = next((getattr(block, n) for n in PRE_MLP_NORMS if hasattr(block, n)), None)
    if norm is None:
        raise UserError(f"cannot find the norm in front of the MLP of {where}",
                        "use a coder on the MLP module's own input (TransformerLens blocks.L.mlp.hook_in)")
    return norm


def _without_affine(norm: torch.nn.Module, where: str):
    """x -> the norm's output before its gain (and bias), computed as the norm computes it."""
    eps = next((getattr(norm, n) for n in ("variance_epsilon", "eps") if getattr(norm, n, None) is not None), None)
    centre = isinstance(norm, torch.nn.LayerNorm)
    if eps is None or not (centre or "rms" in type(norm).__name__.lower()):
        raise UserError(f"the norm in front of the MLP of {where} is a {type(norm).__name__}, neither LayerNorm nor RMSNorm",
                        "use a coder on the MLP module's own input (TransformerLens blocks.L.mlp.hook_in)")

    def normalise(x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        if centre:
            wide = wide - wide.mean(-1, keepdim=True)
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    return normalise


def hook_module(model: torch.nn.Module, hook: HookPoint):
    """(module, read its input?, transform or None) for a hook point: the tensor is the module's
    input or output, passed through the transform where there is one."""
    block = decoder_layers(model)[hook.layer]
    if hook.point in ("resid_pre", "resid_post"):
        return block, hook.point == "resid_pre", None
    where = f"layer {hook.layer} of {type(model).__name__}"
    if hook.point == "mlp_in" and (norm := _pre_mlp_norm(block, where)) is not None:
        return norm, True, _without_affine(norm, where)
    post_norm = next((getattr(block, n) for n in POST_MLP_NORMS if hasattr(block, n)), None)
    if hook.point == "mlp_out" and post_norm is not None:
        return post_norm, False, None
    mlp = next((getattr(block, n) for n in MLP_NAMES if hasattr(block, n)), None)
    if mlp is None:
        raise UserError(f"{where} has no MLP module", "use a resid_pre or resid_post hook")
    return mlp, hook.point in ("mlp_in", "mlp_module_in"), None


@torch.inference_mode()
def capture_points(model: torch.nn.Module, projections: list[torch.nn.Module], points, input_ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """`Subject.capture` on Hugging Face's own forward: a hook per point (`UNITS`: a pre-hook on
    the layer's output projection), and the pass stopped by the hook that completes the set."""
    wanted, got = set(points), {}

    def keep(point: tuple[int, str], x: torch.Tensor, transform) -> None:
        got[point] = (x if transform is None else transform(x)).detach()
        if len(got) == len(wanted):
            raise _StopForward

    def on_input(point, transform):
        return lambda _m, args, kwargs: keep(point, args[0] if args else kwargs["hidden_states"], transform)

    def on_output(point, transform):
        return lambda _m, _args, output: keep(point, output[0] if isinstance(output, tuple) else output, transform)

    handles = []
    for layer, point in wanted:
        if point == UNITS:
            module, reads_input, transform = projections[layer], True, None
        else:
            from autoexplain.sae_coder import HookPoint

            module, reads_input, transform = hook_module(model, HookPoint(layer, point))
        handles.append(module.register_forward_pre_hook(on_input((layer, point), transform), with_kwargs=True) if reads_input
                       else module.register_forward_hook(on_output((layer, point), transform)))
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return got


def capture(model: torch.nn.Module, hook: HookPoint, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, T, d_model] at `hook`, from a forward pass stopped right after it."""
    return capture_points(model, [], [(hook.layer, hook.point)], input_ids)[(hook.layer, hook.point)]
