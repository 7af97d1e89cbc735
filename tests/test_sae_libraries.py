"""Our latents against the formats' own libraries on the same folders.

sae-lens and eai-sparsify both install from the package index next to the pinned CPU torch (their
requirements leave torch alone), but they are not project requirements: sae-lens brings
transformer-lens, wandb and a few dozen more packages. Without them these tests skip, by name.
"""

from __future__ import annotations

import pytest
import torch

from autoexplain.sae import load_coder, parse_source
from tests.test_sae import K, cfg_6x, cfg_pre6, weights, write_saelens, write_sparsify


def x_batch():
    return torch.randn(64, 8, generator=torch.Generator().manual_seed(3)) * 2


@pytest.mark.parametrize("arch,hook,extra", [
    ("standard", "blocks.1.hook_resid_post", {}),
    ("topk", "blocks.1.hook_resid_post", {"k": K, "rescale_acts_by_decoder_norm": False}),
    ("topk", "blocks.1.hook_resid_post", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", "blocks.2.hook_mlp_out", {}),
    ("gated", "blocks.0.hook_resid_pre", {}),
    ("standard", "blocks.1.hook_resid_post", {"normalize_activations": "layer_norm"}),
    ("transcoder", "blocks.1.ln2.hook_normalized", {"d_out": 8}),
    ("jumprelu_transcoder", "blocks.1.ln2.hook_normalized", {"d_out": 8}),
])
def test_against_sae_lens(tmp_path, arch, hook, extra):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install sae-lens)")
    folder = write_saelens(tmp_path / arch, cfg_6x(arch, hook, **extra), weights(arch))
    x = x_batch()
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu").encode(x).detach()
    kind = "transcoder" if "transcoder" in arch else "sae"
    ours = load_coder(parse_source(f"{kind}:{folder}")).encode(x)
    assert (theirs > 0).any()
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_against_sae_lens_pre6(tmp_path, activation):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install sae-lens)")
    arch = "topk" if activation == "topk" else "standard"
    folder = write_saelens(tmp_path / activation, cfg_pre6("blocks.2.hook_resid_pre", activation), weights(arch))
    x = x_batch()
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu").encode(x).detach()
    torch.testing.assert_close(load_coder(parse_source(f"sae:{folder}")).encode(x), theirs.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transcode", [False, True])
def test_against_sparsify(tmp_path, transcode):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install eai-sparsify)")
    folder = write_sparsify(tmp_path / "run" / "layers.1.mlp", weights("topk"), transcode=transcode)
    x = x_batch()
    out = sparsify.SparseCoder.load_from_disk(folder, device="cpu").encode(x)
    theirs = torch.zeros(x.shape[0], 24).scatter_(-1, out.top_indices, out.top_acts.float())
    ours = load_coder(parse_source(f"{'transcoder' if transcode else 'sae'}:{folder}")).encode(x)
    assert (theirs > 0).any()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
