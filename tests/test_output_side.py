"""A unit's output direction through the unembedding (issue 14 item 6), checked against the model's
own computation and a numpy restatement of RMSNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoexplain.output_side import latent_direction, neuron_direction, output_tokens
from autoexplain.subject import load_subject


@pytest.fixture(scope="module")
def subject(tiny_llama_dir):
    return load_subject(tiny_llama_dir, dtype=torch.float32, device="cpu")


def test_neuron_direction_is_what_the_neuron_writes(subject, tiny_gpt2_dir):
    proj = subject.projections[1]
    one_hot = torch.zeros(subject.n_units)
    one_hot[7] = 2.5
    with torch.no_grad():
        torch.testing.assert_close(neuron_direction(proj, 7) * 2.5, proj(one_hot))
    gpt2 = load_subject(tiny_gpt2_dir, dtype=torch.float32, device="cpu")
    proj = gpt2.projections[0]  # Conv1D, weight [in, out], with a bias
    one_hot = torch.zeros(gpt2.n_units)
    one_hot[3] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(neuron_direction(proj, 3), proj(one_hot) - proj(torch.zeros_like(one_hot)))


def test_top_and_bottom_tokens_with_and_without_the_final_norm(subject):
    model = subject.model
    with torch.no_grad():  # a non-trivial norm weight, so that the two lists can differ
        model.model.norm.weight.copy_(torch.linspace(0.1, 3.0, model.config.hidden_size))
    d = neuron_direction(subject.projections[2], 5)
    W_U = model.lm_head.weight.detach().double().numpy()
    dn = d.double().numpy()
    eps = model.config.rms_norm_eps
    normed = dn / np.sqrt((dn ** 2).mean() + eps) * model.model.norm.weight.detach().double().numpy()
    for use_norm, vec in ((False, dn), (True, normed)):
        got = output_tokens(model, d, n=10, normed=use_norm)
        logits = W_U @ vec
        order = np.argsort(-logits)
        assert got.top.ids == order[:10].tolist() and got.bottom.ids == order[::-1][:10].tolist()
        np.testing.assert_allclose(got.top.values, logits[order[:10]], rtol=1e-4)
        assert got.top.values == sorted(got.top.values, reverse=True) and got.bottom.values == sorted(got.bottom.values)
    assert output_tokens(model, d, normed=True).top.ids != output_tokens(model, d).top.ids


def test_latent_direction_is_a_decoder_row():
    from autoexplain.sae_coder import SparseCoder

    W_dec = torch.randn(6, 4)
    coder = SparseCoder("x", "saelens", "standard", False, None, torch.randn(4, 6), torch.zeros(6), W_dec, torch.zeros(4))
    assert torch.equal(latent_direction(coder, 3), W_dec[3])


@pytest.mark.parametrize("bf16_model", [True, False])
def test_ranking_from_bf16_candidates_is_the_float32_ranking(monkeypatch, bf16_model):
    """`output_columns` ranks by a bf16 product's candidates checked in float32; ids and logits
    are those of the float32 product (logits to float32 summation order), both for rows the
    candidates settle and for rows of near-tied tokens, which the check sends to the float32 product."""
    import autoexplain.output_side as side

    g = torch.Generator().manual_seed(3)
    unembed = torch.randn(6000, 48, generator=g)
    if bf16_model:  # its unembedding is exact in bf16
        unembed = unembed.bfloat16().float()
    tied = torch.randn(48, generator=g)
    unembed[:200] = tied + 1e-3 * torch.randn(200, 48, generator=g)  # 200 tokens within 0.1 % of each other
    d = torch.cat([torch.randn(300, 48, generator=g) * torch.rand(300, 1, generator=g) * 5, tied[None] * 2,
                   -tied[None]])
    monkeypatch.setattr(side, "bf16_dot_products", lambda: True)  # the path under test, on any CPU
    redone = []
    ranked = side._ranked
    monkeypatch.setattr(side, "_ranked", lambda logits, n: redone.append(len(logits)) or ranked(logits, n))
    (top_ids, top_vals), (bottom_ids, bottom_vals) = side._extremes(d, side._Vocabulary(unembed), 10)
    assert redone == [2]  # the two near-tied rows (one each way), not the 300 others
    full = d.double() @ unembed.double().T
    want_top, want_bottom = full.topk(10, dim=1), full.topk(10, dim=1, largest=False)
    assert torch.equal(top_ids, want_top.indices) and torch.equal(bottom_ids, want_bottom.indices)
    torch.testing.assert_close(top_vals.double(), want_top.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bottom_vals.double(), want_bottom.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_opposite_polarity_is_its_own_computation(monkeypatch, which, subject, tiny_gpt2_dir):
    """The -1 columns come from the +1 columns swapped and negated where the final norm is odd
    (RMSNorm): the same lists as computing them from the negated directions. A LayerNorm with a
    bias is not odd, and is computed again."""
    import autoexplain.output_side as side
    from autoexplain.output_side import final_norm, neuron_directions, output_columns

    s = subject if which == "llama" else load_subject(tiny_gpt2_dir, dtype=torch.float32, device="cpu")
    norm = final_norm(s.model)
    with torch.no_grad():  # per-channel weights (and a bias for LayerNorm) that reorder the tokens
        norm.weight.copy_(torch.linspace(0.1, 3.0, norm.weight.shape[0]))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.linspace(-1.0, 1.0, norm.bias.shape[0]))
    directions = neuron_directions(s.projections[1])
    computed = []
    columns = side._columns
    monkeypatch.setattr(side, "_columns", lambda *a: computed.append(a[4]) or columns(*a))
    got = output_columns(s.model, directions, s.token_strings, (1, -1))
    assert computed == ([1] if which == "llama" else [1, -1])
    vocab = side._Vocabulary(s.model.get_output_embeddings().weight.detach().float())
    want = [columns(vocab, norm, directions, s.token_strings, p, 10, 256) for p in (1, -1)]
    assert got == want
    if which == "gpt2":  # mirroring would be wrong here: the bias does not flip with the direction
        assert got[1]["promotes_normed"] != got[0]["suppresses_normed"]
