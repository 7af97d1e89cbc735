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
from autoexplain.subject import bf16_dot_products

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
def output_columns(model: torch.nn.Module, directions: torch.Tensor, token_strings, polarities=(1,),
                   n: int = 10, chunk: int = 256) -> list[dict[str, list]]:
    """Per polarity, the unit-statistics columns of `OUTPUT_COLUMNS` for every row of `directions`
    [units, d_model] times the polarity (a negated neuron promotes what the neuron suppresses).
    `token_strings(ids)` names tokens.

    A negated direction's logits are the negated logits, so the opposite polarity's lists are the
    first one's swapped and negated (`mirrored`), equal to computing them up to exact float32 ties,
    wherever the final norm is odd, norm(-d) == -norm(d): RMSNorm and bias-free LayerNorm are,
    bit for bit, and it is checked on these directions. This halves the end-of-pass product work
    for a layer of neurons (1.5 of 4.4 s on the embedded model)."""
    unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    vocab = _Vocabulary(unembed)
    norm = final_norm(model)
    done: dict[int, dict[str, list]] = {}
    for p in polarities:
        if -p in done and _odd(norm, directions):
            done[p] = mirrored(done[-p])
        else:
            done[p] = _columns(vocab, norm, directions, token_strings, p, n, chunk)
    return [done[p] for p in polarities]


def mirrored(cols: dict[str, list]) -> dict[str, list]:
    """The columns of the negated directions, from the columns of the directions."""
    def negated(rows):
        return [[-v for v in row] for row in rows]

    return {"promotes": cols["suppresses"], "promotes_logits": negated(cols["suppresses_logits"]),
            "suppresses": cols["promotes"], "suppresses_logits": negated(cols["promotes_logits"]),
            "promotes_normed": cols["suppresses_normed"], "suppresses_normed": cols["promotes_normed"]}


def _odd(norm: torch.nn.Module | None, directions: torch.Tensor) -> bool:
    if norm is None:
        return True
    x = directions.float().to(next(norm.parameters()).dtype)
    return torch.equal(norm(-x), -norm(x))


def _columns(vocab: "_Vocabulary", norm: torch.nn.Module | None, directions: torch.Tensor, token_strings,
             polarity: int, n: int, chunk: int) -> dict[str, list]:
    """One polarity's columns, `chunk` units per product so that units x vocabulary logits never
    exist at once. At 256 units each temporary stays under glibc's 32 MB mmap ceiling, so it is
    reused from the heap rather than mapped and faulted in afresh per chunk (1,024 was 1.3x slower
    in `_extremes`).

    With the final norm, a single direction's own scale drops out of the ranking; what remains is
    the norm's per-channel weight (and, for LayerNorm, its centring), so the direction goes through
    the norm module itself, as `output_tokens` does. Each product is ranked by `_extremes`."""
    cols: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
    names: dict[int, str] = {}

    def named(ids: torch.Tensor) -> list[list[str]]:
        missing = sorted({int(i) for i in ids.flatten().tolist()} - names.keys())
        names.update(zip(missing, token_strings(missing)))
        return [[names[int(i)] for i in row] for row in ids.tolist()]

    for a in range(0, directions.shape[0], chunk):
        d = directions[a : a + chunk].to(vocab.f32.device).float() * polarity
        (top_ids, top_vals), (bottom_ids, bottom_vals) = _extremes(d, vocab, n)
        cols["promotes"] += named(top_ids)
        cols["promotes_logits"] += top_vals.tolist()
        cols["suppresses"] += named(bottom_ids)
        cols["suppresses_logits"] += bottom_vals.tolist()
        if norm is None:
            cols["promotes_normed"] += [None] * len(d)
            cols["suppresses_normed"] += [None] * len(d)
            continue
        (top_ids, _), (bottom_ids, _) = _extremes(norm(d.to(next(norm.parameters()).dtype)).float(), vocab, n)
        cols["promotes_normed"] += named(top_ids)
        cols["suppresses_normed"] += named(bottom_ids)
    return cols


class _Vocabulary:
    """The unembedding in float32 and bfloat16, with the largest norm of a row and of what rounding
    a row to bf16 changed in it (0 for a bf16 model), for `_extremes`' bound."""

    def __init__(self, unembed: torch.Tensor):
        self.f32 = unembed
        self.bf16 = unembed.bfloat16()
        self.max_norm = float(unembed.norm(dim=1).max())
        self.max_residual = float((unembed - self.bf16.float()).norm(dim=1).max())


# Candidates kept per row from the bf16 product; the float32 check below says whether they sufficed.
# On the embedded model, 32 left 2 of 8,192 rows (random unit directions, with and without the final
# norm) to the float32 product, and was the fastest of 20 to 64.
CANDIDATES = 32
# How far a bf16 logit can be from the float32 one. bf16 keeps 8 significant bits (unit roundoff
# 2**-8): rounding the output costs up to 2**-8 of it (OUT_ERR takes it twice over). Rounding the
# inputs, d = bf16(d) + r and u = bf16(u) + s, changes logit j by r.u + d.s - r.s, at most
# |r| |u| + |d| |s| + |r| |s| (Cauchy-Schwarz; r and s are 0 for a bf16 model's own weights); the
# two products' float32 sums differ by far less than 2**-12 |d| |u| (SUM_ERR) at these widths.
OUT_ERR, SUM_ERR = 2.0**-7, 2.0**-12


def _extremes(d: torch.Tensor, vocab: _Vocabulary, n: int):
    """((top ids, top logits), (bottom ids, bottom logits)), each (rows, n), of `d @ unembed.T` in
    float32, sorted as `topk` sorts them.

    The full product is what the end of a recording pass spends most on (16,384 latents x 49,152
    tokens, twice), and bf16 runs it 3-4x faster than float32 on CPUs with bf16 dot products
    (torch's CPU bf16 matmul sums in float32, which the bound relies on). So the bf16 product
    picks `CANDIDATES` per row each way, their logits are computed in float32 as dot products,
    and a row keeps them only where its n-th float32 logit clears the most any token outside its
    candidates could reach given the bf16 error bound; other rows (rare: near-ties across the
    whole candidate list) are ranked by the float32 product. Ids are therefore those of the
    float32 ranking, and logits are float32 dot products, equal to the full product's up to the
    order of float32 summation (~1e-7 relative; tokens that close can swap places)."""
    m = min(CANDIDATES, vocab.f32.shape[0])
    if m <= n or not bf16_dot_products():  # the float32 product: cheap enough, or bf16 no faster
        return _ranked(d @ vocab.f32.T, n)
    low = d.bfloat16()
    r, size = (d - low.float()).norm(dim=1), d.norm(dim=1)
    slack = (r * (vocab.max_norm + vocab.max_residual) + size * (vocab.max_residual + SUM_ERR * vocab.max_norm))
    slack *= 1 + 2.0**-10  # the norms' own rounding
    approx = low @ vocab.bf16.T
    out, fallback = [], torch.zeros(len(d), dtype=torch.bool)
    for largest in (True, False):
        cand = approx.topk(m, dim=1, largest=largest)
        edge = cand.values[:, -1].float()  # every token outside the candidates is on the far side
        reach = edge + OUT_ERR * edge.abs() + slack if largest else edge - OUT_ERR * edge.abs() - slack
        exact = torch.bmm(vocab.f32[cand.indices], d[:, :, None]).squeeze(2)  # (rows, m) float32
        vals, order = exact.topk(n, dim=1, largest=largest)
        fallback |= ~(vals[:, -1] > reach) if largest else ~(vals[:, -1] < reach)
        out.append([cand.indices.gather(1, order), vals])
    redo = fallback.nonzero().squeeze(1)
    if len(redo):
        full = _ranked(d[redo] @ vocab.f32.T, n)
        for (ids, vals), (fids, fvals) in zip(out, full):
            ids[redo], vals[redo] = fids, fvals
    return tuple((ids, vals) for ids, vals in out)


def _ranked(logits: torch.Tensor, n: int):
    top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
    return (top.indices, top.values), (bottom.indices, bottom.values)
