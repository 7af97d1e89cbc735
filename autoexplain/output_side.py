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


def neuron_directions(projection: torch.nn.Module) -> torch.Tensor:
    """[units, d_model]: the columns of an MLP output projection (`Subject.projections[layer]`), what
    each neuron adds to the residual stream per unit of activation."""
    weight = projection.weight.detach()
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    return weight.T if isinstance(projection, torch.nn.Linear) else weight


def neuron_direction(projection: torch.nn.Module, unit: int) -> torch.Tensor:
    return neuron_directions(projection)[unit].float()


def latent_direction(coder: SparseCoder, latent: int) -> torch.Tensor:
    return coder.W_dec[latent].float()


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(model, "base_model", model)
    return next((getattr(base, n) for n in FINAL_NORMS if isinstance(getattr(base, n, None), torch.nn.Module)), None)


@torch.no_grad()
def output_tokens(model: torch.nn.Module, direction: torch.Tensor, n: int = 10, normed: bool = False) -> OutputTokens:
    """Top and bottom `n` tokens of `direction @ W_U`, after the model's final norm when `normed`."""
    unembed = model.get_output_embeddings().weight.detach()  # [vocab, d_model]
    d = direction.to(unembed.device).float().reshape(1, -1)
    if normed:
        norm = final_norm(model)
        if norm is None:
            raise ValueError(f"no final norm found on {type(model).__name__} (looked for {', '.join(FINAL_NORMS)})")
        d = norm(d.to(next(norm.parameters()).dtype))
    logits = (d.float() @ unembed.float().T)[0]
    top, bottom = logits.topk(n), (-logits).topk(n)
    return OutputTokens(TokenList(top.indices.tolist(), top.values.tolist()),
                        TokenList(bottom.indices.tolist(), (-bottom.values).tolist()), normed)


OUTPUT_COLUMNS = ("promotes", "promotes_logits", "suppresses", "suppresses_logits", "promotes_normed",
                  "suppresses_normed")


@torch.no_grad()
def output_columns(model: torch.nn.Module, directions: torch.Tensor, token_strings, polarity: int = 1,
                   n: int = 10, chunk: int = 1024) -> dict[str, list]:
    """The unit-statistics columns of `OUTPUT_COLUMNS` for every row of `directions` [units, d_model]
    (times `polarity`: a negated neuron promotes what the neuron suppresses), `chunk` units per
    product so that units x vocabulary logits never exist at once. `token_strings(ids)` names tokens.

    With the final norm, a single direction's own scale drops out of the ranking; what remains is
    the norm's per-channel weight (and, for LayerNorm, its centring), so the direction goes through
    the norm module itself, as `output_tokens` does."""
    unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    norm = final_norm(model)
    cols: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
    names: dict[int, str] = {}

    def named(ids: torch.Tensor) -> list[list[str]]:
        missing = sorted({int(i) for i in ids.flatten().tolist()} - names.keys())
        names.update(zip(missing, token_strings(missing)))
        return [[names[int(i)] for i in row] for row in ids.tolist()]

    for a in range(0, directions.shape[0], chunk):
        d = directions[a : a + chunk].to(unembed.device).float() * polarity
        logits = d @ unembed.T
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        cols["promotes"] += named(top.indices)
        cols["promotes_logits"] += top.values.tolist()
        cols["suppresses"] += named(bottom.indices)
        cols["suppresses_logits"] += bottom.values.tolist()
        if norm is None:
            cols["promotes_normed"] += [None] * len(d)
            cols["suppresses_normed"] += [None] * len(d)
            continue
        normed = norm(d.to(next(norm.parameters()).dtype)).float() @ unembed.T
        cols["promotes_normed"] += named(normed.topk(n, dim=1).indices)
        cols["suppresses_normed"] += named(normed.topk(n, dim=1, largest=False).indices)
    return cols
