"""The streaming recorder against a brute-force recomputation, and the leak-free split guarantee."""

import numpy as np
import polars as pl
import pytest
import torch

from autoexplain.errors import UserError
from autoexplain.record import RecordConfig, build_windows, record_layers
from autoexplain.records import SPLITS
from autoexplain.splits import document_splits
from autoexplain.subject import load_subject

CFG = dict(top_k=12, n_random=8, quantile_per_bin=2, reservoir=64, batch_size=7, seed=3)


@pytest.fixture(scope="module")
def recorded(tiny_llama_dir, prose_corpus, tmp_path_factory):
    prose = prose_corpus
    out = tmp_path_factory.mktemp("out")
    subject = load_subject(tiny_llama_dir)
    windows = build_windows(subject, str(prose), out, window_len=8, seed=3)
    ref = record_layers(subject, windows, RecordConfig([0, 2], **CFG), out)
    return subject, windows, ref, out


def _all_activations(subject, windows, layer):
    table = pl.read_parquet(windows.path)
    ids = torch.tensor(np.stack(table["token_ids"].to_numpy()), dtype=torch.long)
    return table["window_id"].to_numpy(), subject.mlp_activations(ids, [layer])[layer].float().numpy()


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("polarity", [1, -1])
def test_top_windows_match_brute_force(recorded, layer, polarity):
    """Per unit, each split's top windows are the strongest of that split's documents; together,
    strongest first."""
    subject, windows, ref, _ = recorded
    wids, acts = _all_activations(subject, windows, layer)  # (N, T, U)
    oriented = acts * polarity
    window_max = oriented.max(axis=1)  # (N, U)
    split = np.array(document_splits(pl.read_parquet(windows.path)["doc_id"].to_numpy(), CFG["seed"]))
    recs = pl.read_parquet(ref.records_path(layer)).filter(
        (pl.col("polarity") == polarity) & (pl.col("kind") == "top"))
    quota = CFG["top_k"] // len(SPLITS)
    for unit in range(0, subject.n_units, 5):
        got = recs.filter(pl.col("unit") == unit).sort("rank")
        expected = []
        for s in range(len(SPLITS)):
            in_split = np.sort(window_max[split == s, unit])[::-1][:quota]
            expected += [(v, SPLITS[s]) for v in in_split if v > 0]
        expected.sort(key=lambda e: -e[0])
        np.testing.assert_allclose(got["max_activation"].to_numpy(), [v for v, _ in expected], rtol=1e-2, atol=1e-3)
        for s in SPLITS:  # the values of each split's own ranking (ties across splits may swap ranks)
            np.testing.assert_allclose(got.filter(pl.col("split") == s)["max_activation"].to_numpy(),
                                       [v for v, e in expected if e == s], rtol=1e-2, atol=1e-3)
        for row in got.iter_rows(named=True):
            i = int(np.nonzero(wids == row["window_id"])[0][0])
            assert SPLITS[split[i]] == row["split"]
            np.testing.assert_allclose(row["activations"], oriented[i, :, unit], rtol=1e-2, atol=1e-3)
            assert max(row["activations"]) == pytest.approx(row["max_activation"], rel=1e-2, abs=1e-3)


def test_stats_match_brute_force(recorded):
    subject, windows, ref, _ = recorded
    _, acts = _all_activations(subject, windows, 2)
    flat = acts.reshape(-1, acts.shape[-1])
    stats = pl.read_parquet(ref.stats_path(2))
    pos = stats.filter(pl.col("polarity") == 1).sort("unit")
    neg = stats.filter(pl.col("polarity") == -1).sort("unit")
    np.testing.assert_allclose(pos["mean"], flat.mean(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(pos["std"], flat.std(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(pos["max"], flat.max(0), rtol=1e-3)
    np.testing.assert_allclose(neg["max"], -flat.min(0), rtol=1e-3)
    np.testing.assert_allclose(pos["frac_active"], (flat > 0).mean(0))
    np.testing.assert_allclose(neg["frac_active"], (flat < 0).mean(0))
    assert pos["n_tokens"][0] == flat.shape[0]
    assert all(sum(c) == min(64, windows.n_windows) * 8 for c in pos["hist_counts"].to_list())


def test_splits_never_leak(recorded):
    """No window the explainer sees (train) may score its explanation: a known peer defect."""
    _, _, ref, _ = recorded
    recs = pl.concat([pl.read_parquet(ref.records_path(L)) for L in (0, 2)])
    per_window = recs.group_by("layer", "unit", "polarity", "window_id").agg(pl.col("split").n_unique().alias("n"),
                                                                             pl.len().alias("rows"))
    assert per_window["rows"].max() == 1, "a window appears twice for one unit"
    train = recs.filter(pl.col("split") == "train").select("layer", "unit", "polarity", "window_id")
    scoring = recs.filter(pl.col("split") != "train").select("layer", "unit", "polarity", "window_id")
    assert train.join(scoring, on=["layer", "unit", "polarity", "window_id"]).height == 0
    assert recs.filter((pl.col("kind") == "random") & (pl.col("split") == "train")).height == 0


def test_each_split_gets_a_quarter_of_the_top_windows(recorded):
    _, _, ref, _ = recorded
    top = pl.read_parquet(ref.records_path(0)).filter(pl.col("kind") == "top")
    per = top.group_by("unit", "polarity", "split").len()
    assert per["len"].to_list() == [CFG["top_k"] // len(SPLITS)] * per.height  # every unit fires in every split here
    assert per.height == top.select(pl.struct("unit", "polarity").n_unique()).item() * len(SPLITS)


def test_every_unit_has_all_kinds(recorded):
    subject, _, ref, _ = recorded
    recs = pl.read_parquet(ref.records_path(2))
    kinds = recs.group_by("unit", "polarity", "kind").len()
    assert kinds.filter(pl.col("kind") == "top")["len"].min() == CFG["top_k"]
    assert kinds.filter(pl.col("kind") == "random")["len"].min() == CFG["n_random"]
    assert kinds.filter(pl.col("kind") == "quantile").height == subject.n_units * 2


def test_rerun_reuses_the_content_addressed_output(recorded):
    subject, windows, ref, out = recorded
    before = ref.records_path(0).stat().st_mtime_ns
    again = record_layers(subject, windows, RecordConfig([2, 0], **CFG), out)
    assert again.directory == ref.directory
    assert ref.records_path(0).stat().st_mtime_ns == before
    subset = record_layers(subject, windows, RecordConfig([0], **CFG), out)
    assert (subset.directory, subset.layers) == (ref.directory, [0, 2]), "a layer of a recording is recorded again"
    other = record_layers(subject, windows, RecordConfig([1], **CFG), out)
    assert other.directory != ref.directory and other.layers == [1]
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"


def test_too_few_windows_is_a_clear_error(tiny_llama_dir, prose_file, tmp_path):
    subject = load_subject(tiny_llama_dir)
    windows = build_windows(subject, str(prose_file), tmp_path, window_len=64)
    with pytest.raises(UserError, match=r"only \d+ windows.*need at least 1030"):
        record_layers(subject, windows, RecordConfig([0], top_k=1000, n_random=30), tmp_path)
    assert not (tmp_path / "records").exists(), "nothing half-written"


def test_corpus_shorter_than_a_window(tiny_llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    with pytest.raises(UserError, match="shorter than one window of 64 tokens"):
        build_windows(load_subject(tiny_llama_dir), str(short), tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.parquet"))


@pytest.mark.parametrize("sign", [1, -1])
def test_shape_stats_match_float64(sign):
    """The end-of-pass shape statistics run in float32; they match a float64 computation, and bf16
    samples that sit exactly on a bin edge land in the same bin."""
    from autoexplain.selection import shape_stats_per_unit

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 300, generator=g) * torch.rand(300, generator=g)
         + 0.2 * torch.randn(4096, 300, generator=g) ** 3).bfloat16()
    x[:, 7] = 0.5  # a constant unit: undefined shape, every sample in one bin
    got = shape_stats_per_unit(x, bins=32, chunk=128, signs=(sign,))[sign]
    ref = x.double().numpy() * sign
    mu, sd = ref.mean(0), ref.std(0)
    z = (ref - mu) / np.where(sd > 0, sd, 1)
    with np.errstate(invalid="ignore"):
        skew, kurt = np.where(sd > 0, (z**3).mean(0), np.nan), np.where(sd > 0, (z**4).mean(0) - 3, np.nan)
    np.testing.assert_allclose(got["skewness"], skew, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got["kurtosis"], kurt, rtol=1e-3, atol=1e-4)
    lo, hi = ref.min(0), ref.max(0)
    width = np.where(hi > lo, hi - lo, 1)
    bins = np.clip(np.floor((ref - lo) / width * 32), 0, 31).astype(int)
    for u in range(0, 300, 7):
        np.testing.assert_array_equal(got["hist_counts"][u], np.bincount(bins[:, u], minlength=32))
        np.testing.assert_allclose(got["hist_edges"][u][[0, -1]], [lo[u], hi[u] if hi[u] > lo[u] else lo[u] + 1], rtol=1e-6)


def test_both_signs_from_one_copy_are_each_sign_alone_bit_for_bit():
    """The -1 statistics come from the +1 copy (offsets from the maximum, the third moment negated):
    the same bits as computing them from negated samples, samples on bin edges and constant and
    undefined units included."""
    from autoexplain.selection import shape_stats_per_unit

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2048, 70, generator=g) * 3).bfloat16()
    x[:, :10] = torch.randint(0, 33, (2048, 10), generator=g).bfloat16()  # every bin edge is hit
    x[:, 10] = 0.5
    both = shape_stats_per_unit(x, bins=32, chunk=32, signs=(1, -1))
    for sign in (1, -1):
        alone = shape_stats_per_unit(x * sign, bins=32, chunk=32)[1]
        for name in ("skewness", "kurtosis"):
            assert both[sign][name].tobytes() == alone[name].tobytes(), name
        for name in ("hist_edges", "hist_counts"):
            assert all(a.tobytes() == b.tobytes() for a, b in zip(both[sign][name], alone[name])), name


@pytest.mark.parametrize("sign", [1, -1])
def test_top_windows_keep_each_window_with_its_activations(sign):
    """Ranks move while payload slots stay put: after many batches (bf16 values, so many ties), each
    unit keeps the k largest window maxima, and the activations shown for each kept window are that
    window's own."""
    from autoexplain.selection import TopWindows

    g = torch.Generator().manual_seed(1)
    k, T, U = 8, 6, 50
    top, batches = TopWindows(k, T, U), []
    for b in range(40):
        acts = (torch.randn(5, T, U, generator=g) * (1 + b / 10)).bfloat16()
        batches.append(acts)
        window_max = (acts.amax(1) if sign > 0 else -acts.amin(1)).float()
        top.update(torch.arange(5 * b, 5 * b + 5), acts, window_max, sign=sign)
    oriented = torch.cat(batches).float() * sign
    best = oriented.amax(1).sort(dim=0, descending=True).values[:k]
    assert torch.equal(top.values, best)
    payload = top.ranked_payload().float()
    for u in range(U):
        for r in range(k):
            assert torch.equal(payload[r, :, u], oriented[top.window_ids[r, u], :, u]), (r, u)
            assert oriented[top.window_ids[r, u], :, u].max() == top.values[r, u]
