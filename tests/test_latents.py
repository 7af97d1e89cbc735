"""A sparse coder's latents recorded from their non-zero entries: each streaming piece (running
statistics, best windows, reservoir) fed the entries keeps what it keeps when fed the dense batch,
and a TopK coder, whose chosen latents never become a dense tensor, records what its dense
latents record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoexplain.latents import SparseLatents
from autoexplain.record import RecordConfig, build_windows, record_layers
from autoexplain.selection import Reservoir, RunningStats, SparseReservoir, TopWindows
from autoexplain.source_coder import open_unit_source
from autoexplain.subject import load_subject
from tests.test_sae import cfg_6x, write_saelens
from tests.test_sae_units import D_MODEL, assert_same_recording


def topk_batch(g: torch.Generator, B: int, T: int, U: int, k: int) -> tuple[torch.Tensor, SparseLatents]:
    """A dense batch of TopK latents and its entries; the shift leaves some chosen values at 0."""
    top = (torch.randn(B, T, U, generator=g) - 2.0).topk(k, dim=-1)
    values = top.values.relu()
    dense = torch.zeros(B, T, U).scatter_(-1, top.indices, values)
    return dense, SparseLatents.from_topk(top.indices, values, U)


def test_entries_are_the_dense_batch():
    g = torch.Generator().manual_seed(0)
    dense, entries = topk_batch(g, 6, 9, 70, 5)
    assert 0 < len(entries.value) < 6 * 9 * 5  # some chosen latents were 0 and are no entries
    assert (entries.value > 0).all()
    assert torch.equal(entries.dense(), dense)
    assert torch.equal(SparseLatents.from_dense(dense).dense(), dense)
    assert torch.equal(entries.window_max(), dense.amax(dim=1))
    rows, latents = torch.tensor([0, 5, 5, 2, 3]), torch.tensor([4, 4, 69, 0, 11])
    assert torch.equal(entries.windows(rows, latents), dense[rows, :, latents])


def test_streaming_state_from_entries_equals_the_dense_one():
    """Forty batches through both paths: equal best windows (values, ids, payload), reservoir and
    counts; sums equal to float32 rounding (the dense path sums each batch in float32)."""
    g = torch.Generator().manual_seed(1)
    k, B, T, U = 8, 5, 6, 60
    sample = np.random.default_rng(0).choice(200, size=30, replace=False)
    top_d, top_s = TopWindows(k, T, U), TopWindows(k, T, U)
    res_d, res_s = Reservoir(sample, T, U), SparseReservoir(sample, T, U)
    stats_d, stats_s = RunningStats(U), RunningStats(U)
    for b in range(40):
        dense, entries = topk_batch(g, B, T, U, 3)
        ids = torch.arange(B * b, B * b + B)
        hi = dense.amax(dim=1)
        top_d.update(ids, dense, hi)
        top_s.update(ids, entries, entries.window_max())
        res_d.update(ids, dense)
        res_s.update(ids, entries)
        stats_d.update(dense, hi, dense.amin(dim=1))
        stats_s.update_sparse(entries, entries.window_max())
    for name in ("values", "window_ids", "slots", "payload"):
        assert torch.equal(getattr(top_d, name), getattr(top_s, name)), name
    assert torch.equal(res_d.chunk(7, 50), res_s.chunk(7, 50)) and (res_d.filled == res_s.filled).all()
    # What the end of the pass reads: per-window maxima, and the tokens of some (window, unit)
    # pairs, in no particular order, some where the unit fired and some where it did not.
    hot = (res_d.acts.amax(dim=1) > 0).nonzero()[::5]
    cold = (res_d.acts.amax(dim=1) == 0).nonzero()[::40]
    slots, units = torch.cat([hot.flip(0), cold]).unbind(1)
    assert len(hot) > 10 and len(cold) > 10
    for sign in (1, -1):
        assert torch.equal(res_d.window_max(7, 50, sign), res_s.window_max(7, 50, sign))
        assert torch.equal(res_d.windows(slots, units, sign), res_s.windows(slots, units, sign))
    dense_sum, sparse_sum = stats_d.summary(1), stats_s.summary(1)
    for name in ("max", "frac_active"):
        np.testing.assert_array_equal(dense_sum[name], sparse_sum[name])
    for name in ("mean", "std"):
        np.testing.assert_allclose(dense_sum[name], sparse_sum[name], rtol=1e-6)
    assert stats_d.n == stats_s.n == 40 * B * T


@pytest.mark.parametrize("sign", [1, -1])
def test_shape_statistics_from_the_reservoir_entries_equal_the_dense_ones(sign):
    """Histograms bit for bit, skewness and kurtosis to float32 rounding (the dense path sums in
    float32); including a latent that fired at every sampled position (no zeros among its samples),
    one that fired once, and ones that never fired (undefined shape, every sample in one bin)."""
    g = torch.Generator().manual_seed(2)
    B, T, U = 4, 16, 50
    sample = np.arange(0, 40, 3)
    res_d, res_s = Reservoir(sample, T, U), SparseReservoir(sample, T, U)
    for b in range(10):
        dense, _ = topk_batch(g, B, T, U, 6)
        dense[:, :, 0] = torch.rand(B, T, generator=g) + 0.25
        dense[:, :, 1] = 0.0
        dense[:, :, 2] = 0.0
        if b == 3:
            dense[0, 5, 2] = 0.75  # window 12, in the sample
        dense[:, :, 3] *= 7.0  # a wider range than the others
        ids = torch.arange(B * b, B * b + B)
        res_d.update(ids, dense)
        res_s.update(ids, SparseLatents.from_dense(dense))
    want, got = res_d.shape_stats(signs=(sign,))[sign], res_s.shape_stats(signs=(sign,))[sign]
    for u in range(U):
        np.testing.assert_array_equal(got["hist_counts"][u], want["hist_counts"][u])
        np.testing.assert_array_equal(got["hist_edges"][u], want["hist_edges"][u])
    assert want["hist_counts"][1][0] == len(sample) * T and np.isnan(got["skewness"][1])
    assert np.isfinite(got["kurtosis"][[0, 2, 3]]).all()
    for name in ("skewness", "kurtosis"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "groupmax"])
def test_a_coder_that_chooses_latents_records_what_its_dense_latents_record(arch, tiny_llama_dir, prose_corpus,
                                                                            tmp_path, monkeypatch):
    latents, k = 48, 4
    g = torch.Generator().manual_seed(5)
    t = {"W_enc": torch.randn(D_MODEL, latents, generator=g), "W_dec": torch.randn(latents, D_MODEL, generator=g),
         "b_dec": torch.zeros(D_MODEL), "b_enc": torch.randn(latents, generator=g) - 1.0}
    cfg = dict(cfg_6x("topk", "blocks.1.hook_resid_post", k=k, rescale_acts_by_decoder_norm=False),
               d_in=D_MODEL, d_sae=latents)
    source = open_unit_source(f"sae:{write_saelens(tmp_path / 'sae', cfg, t)}", tiny_llama_dir)
    source.coder.architecture = arch  # groupmax: the same weights, one winner per block of 12
    subject = load_subject(tiny_llama_dir)
    x = subject.hidden_states(torch.tensor([[5, 9, 200, 31, 7]]), source.coder.hook)
    assert torch.equal(SparseLatents.from_topk(*source.coder.encode_chosen(x), latents).dense(), source.coder.encode(x))

    windows = build_windows(subject, str(prose_corpus), tmp_path, window_len=8, seed=0)
    rec = RecordConfig([1], top_k=10, n_random=6, quantile_per_bin=1, reservoir=40)
    sparse = record_layers(subject, windows, rec, tmp_path / "sparse", source=source)
    monkeypatch.setattr(type(source), "sparse", False)
    dense = record_layers(subject, windows, rec, tmp_path / "dense", source=source)
    assert_same_recording(sparse, dense, 1)
