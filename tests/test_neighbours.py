"""The similar-units search updated after some explanations changed gives what a search from scratch
gives: the same shortlists as far as they are known, the same neighbours, and only the rows near a
change searched again."""

import numpy as np

from autoexplain.neighbours import nearest, ranked, search, stale, update

KEEP, SHORT = 24, 12


def unit_rows(x):
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def model(seed=0, n=2000, d=16):
    """Rows in a few clusters, groups of rows sharing one vector (units with one explanation), some
    empty; a projection that loses part of them, so that the shortlist matters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d))
    v = centres[rng.integers(0, 12, n)] + 0.4 * rng.normal(size=(n, d))
    v[100:160] = v[7]
    v[400:430] = v[9]
    v[rng.choice(n, 40, replace=False)] = 0
    axes = np.linalg.qr(rng.normal(size=(d, 6)))[0]
    return unit_rows(v), axes, rng


def edited(v, rng):
    """A rebuild's vectors: new texts for some rows, some rows taking a shared text, some emptied,
    some empty ones explained."""
    w = v.copy()
    n = len(v)
    w[rng.choice(n, 30, replace=False)] = unit_rows(rng.normal(size=(30, v.shape[1])) + 2 * v[rng.choice(n, 30)])
    w[rng.choice(n, 10, replace=False)] = v[7]
    w[rng.choice(n, 10, replace=False)] = 0
    empty = np.flatnonzero(~v.any(axis=1))
    w[empty[:5]] = unit_rows(rng.normal(size=(5, v.shape[1])))
    return w, (w != v).any(axis=1)


def assert_same_search(got, fresh):
    for i in range(len(fresh.columns)):
        k = got.known[i]
        assert k >= SHORT, i
        assert got.columns[i, :k].tolist() == fresh.columns[i, :k].tolist(), i
        np.testing.assert_array_equal(got.values[i, :k], fresh.values[i, :k])


def test_an_updated_search_is_the_search_from_scratch():
    v, axes, rng = model()
    kept = search(v, axes, KEEP, block=256)
    for round_ in range(3):  # updates of updates: what is known shrinks, then rows are searched again
        w, changed = edited(v, rng)
        got = update(kept, w, axes, changed, shortlist=SHORT, block=300)
        fresh = search(w, axes, KEEP, block=256)
        assert_same_search(got, fresh)
        assert changed.sum() <= got.searched < len(v) // 4, round_  # not the whole search again
        for a, b in zip(ranked(w, got, 5, SHORT), ranked(w, fresh, 5, SHORT)):
            np.testing.assert_array_equal(a, b)
        assert (ranked(w, fresh, 5, SHORT)[0] == nearest(w, 5, axes=axes, shortlist=SHORT)[0]).all()
        v, kept = w, got


def test_rows_that_lose_many_kept_candidates_are_searched_again():
    """A row whose shortlist loses most of its kept candidates to the change cannot be completed
    from them: it is searched again, and its neighbours are still the right ones."""
    v, axes, rng = model(seed=1)
    kept = search(v, axes, KEEP, block=256)
    w = v.copy()
    w[100:160] = unit_rows(rng.normal(size=(60, v.shape[1])))  # the whole group of 7 moves away
    changed = (w != v).any(axis=1)
    got = update(kept, w, axes, changed, shortlist=SHORT)
    assert got.searched > changed.sum()  # unit 7 lost all its copies: searched again
    assert_same_search(got, search(w, axes, KEEP))
    assert not update(got, w, axes, np.zeros(len(w), bool)).searched  # nothing changed, nothing searched


def test_only_stale_rows_are_ranked_again():
    """Rows that `stale` leaves out keep the answer they had: the same as ranking every row again."""
    v, axes, rng = model(seed=2)
    kept = search(v, axes, KEEP)
    idx, sim = ranked(v, kept, 5, SHORT)
    w, changed = edited(v, rng)
    nudged = rng.choice(np.flatnonzero(~changed & v.any(axis=1)), 10, replace=False)
    w[nudged] = unit_rows(w[nudged] + 0.01 * rng.normal(size=(10, v.shape[1])))  # moved, but still near
    changed[nudged] = True
    got = update(kept, w, axes, changed, shortlist=SHORT)
    redo = np.flatnonzero(stale(kept, got, changed, SHORT))
    assert changed.sum() < len(redo) < len(v) // 2
    idx[redo], sim[redo] = ranked(w, got, 5, SHORT, rows=redo)
    want = ranked(w, got, 5, SHORT)
    np.testing.assert_array_equal(idx, want[0])
    np.testing.assert_array_equal(sim, want[1])


def test_a_site_rebuild_updates_the_last_search(tmp_path, monkeypatch):
    """write_meaning after a few explanations changed updates the last build's search (few rows
    searched) and writes what a build from scratch writes."""
    import autoexplain.neighbours as neighbours
    import autoexplain.view_meaning as view_meaning

    monkeypatch.setattr(view_meaning, "EXACT_UP_TO", 50)  # the shortlisted search on a small site
    searched = []
    real_search = neighbours.search
    monkeypatch.setattr(neighbours, "search", lambda *a, **kw: searched.append(real_search(*a, **kw)) or searched[-1])
    words = ["rain", "snow", "winter", "cold", "dogs", "cats", "numbers", "dates", "years", "verbs", "names", "cities"]
    rng = np.random.default_rng(0)
    texts = [f"{words[i % 12]} and {words[(i * 7) % 12]}" if i % 9 else "" for i in range(240)]
    later = list(texts)
    for i in rng.choice(240, 6, replace=False):
        later[i] = "words about the sea"

    def groups(ts):
        return [("L1/mlp", [f"u{i}" for i in range(120)], ts[:120], [0.5] * 120),
                ("L2/mlp", [f"u{i}" for i in range(120, 240)], ts[120:], [0.4] * 120)]

    first = view_meaning.write_meaning(tmp_path / "a", groups(texts), tmp_path / "cache")
    assert sum(s.searched for s in searched) == 240
    searched.clear()
    again = view_meaning.write_meaning(tmp_path / "a", groups(later), tmp_path / "cache")
    assert 6 <= sum(s.searched for s in searched) < 120
    scratch = view_meaning.write_meaning(tmp_path / "b", groups(later), tmp_path / "cache2")
    assert again == scratch and again != first
    for f in (tmp_path / "b").rglob("*.js"):
        assert f.read_bytes() == (tmp_path / "a" / f.relative_to(tmp_path / "b")).read_bytes()
    assert len(list((tmp_path / "cache").glob("meaning-*.npz"))) == 1
