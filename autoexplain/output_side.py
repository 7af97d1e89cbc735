"""What a unit writes: its output direction read through the unembedding, as token lists.

A neuron writes column i of its MLP's output projection; an SAE latent writes row i of `W_dec`.
Neuronpedia shows `direction @ W_U` (no final norm, top and bottom 10 tokens); VocabProj applies
the final norm first, as the model does to the residual stream. Both are given, since a norm with
a learned per-channel weight can reorder the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoexplain.sae_coder import SparseCoder

FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass
class TokenList:
    ids: list[int]
    values: list[float]


@dataclass
class OutputTokens:
    top: TokenList  # the tokens the direction promotes most
    bottom: TokenList  # and suppresses most
    normed: bool


def neuron_direction(projection: torch.nn.Module, unit: int) -> torch.Tensor:
    """Column `unit` of an MLP output projection (`Subject.projections[layer]`): what one neuron adds
    to the residual stream per unit of activation."""
    weight = projection.weight.detach()
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    return (weight[:, unit] if isinstance(projection, torch.nn.Linear) else weight[unit]).float()


def latent_direction(coder: SparseCoder, latent: int) -> torch.Tensor:
    return coder.W_dec[latent].float()


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(model, "base_model", model)
    return next((getattr(base, n) for n in FINAL_NORMS if isinstance(getattr(base, n, None), torch.nn.Module)), None)


@torch.no_grad()
def output_tokens(model: torch.nn.Module, direction: torch.Tensor, n: int = 10, normed: bool = False) -> OutputTokens:
    """Top and bottom `n` tokens of `direction @ W_U`, after the model's final norm when `normed`."""
    unembed = model.get_output_embeddings().weight.detach()  # [vocab, d_model]
    d = direction.to(unembed.device, unembed.dtype).reshape(1, -1)
    if normed:
        norm = final_norm(model)
        if norm is None:
            raise ValueError(f"no final norm found on {type(model).__name__} (looked for {', '.join(FINAL_NORMS)})")
        d = norm(d)
    logits = (d.float() @ unembed.float().T)[0]
    top, bottom = logits.topk(n), (-logits).topk(n)
    return OutputTokens(TokenList(top.indices.tolist(), top.values.tolist()),
                        TokenList(bottom.indices.tolist(), (-bottom.values).tolist()), normed)
