"""Fits in bounded memory: streamed fits equal the in-memory formulas, their memory does
not grow with the fitting set, KNN searches a bank it never holds, saved fits are
memory-mapped, float datasets are stored for read speed."""
import tracemalloc

import h5py
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

import gradood.analyze.data as data_module
from gradood.analyze.fitting import FitStore, fit_estimator, score_cache
from gradood.analyze.registry import all_entries, entry
from gradood.analyze.streaming import exact_percentile, kth_nearest
from gradood.store.gaussian import class_gaussian, sq_distances
from gradood.store.reader import CacheReader
from gradood.store.synthetic import write_synthetic


def _synthetic_attrs():
    import tempfile
    with CacheReader(write_synthetic(tempfile.mkdtemp() + "/probe.h5", 12, num_classes=3, dim=4)) as r:
        return r.attrs


# every fitted score a synthetic cache serves (logits, features, head), from the registry
FITTED = [n for n, e in all_entries().items() if e.fitted and not e.problems(_synthetic_attrs())]
# ... and of those, the fits whose memory does not grow with the fitting set (fit_memory)
BOUNDED = [n for n in FITTED if not entry(n).fit_grows]


@pytest.fixture(scope="session")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    train = write_synthetic(str(d / "syn_train.h5"), 3000, num_classes=12, dim=24, seed=1, split="train")
    test = write_synthetic(str(d / "syn.h5"), 400, num_classes=12, dim=24, seed=2)
    ood = write_synthetic(str(d / "ood.h5"), 300, num_classes=12, dim=24, seed=3, novel=1.0)
    return train, test, ood


def fit_and_score(train, tests, name, block_bytes, monkeypatch, **params):
    monkeypatch.setattr(data_module, "FIT_BLOCK_BYTES", block_bytes)
    with CacheReader(train) as r:
        est = fit_estimator(r, name, params)
    out = []
    for path in tests:
        with CacheReader(path) as r:
            out.append(score_cache(r, name, est, params))
    return est, np.concatenate(out)


@pytest.mark.parametrize("name", FITTED)
def test_streamed_fit_equals_one_block(caches, name, monkeypatch):
    """The same fit from ~20 blocks of 150 rows as from one block of every row: equal to
    rounding (sums in another order), exactly for counts, percentiles and gathers."""
    train, test, ood = caches
    one, a = fit_and_score(train, (test, ood), name, 1 << 30, monkeypatch)
    many, b = fit_and_score(train, (test, ood), name, 150 * 8 * (24 + 12), monkeypatch)
    assert data_module.fit_block_rows(type("D", (), {"attrs": {"feature_dim": 24, "num_classes": 12}, "_needs": None})()) == 150
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * np.abs(a).max())
    assert np.ptp(a) > 0


def test_fits_equal_the_in_memory_formulas(caches, monkeypatch):
    train, _, _ = caches
    with CacheReader(train) as r:
        x = r.read_all("features").astype(np.float64)
        y = r.read_all("labels")
        w, b = r.head()
    monkeypatch.setattr(data_module, "FIT_BLOCK_BYTES", 4096)       # 14 rows a block
    with CacheReader(train) as r:
        maha = fit_estimator(r, "mahalanobis")
        react = fit_estimator(r, "react", {"percentile": 83.0})
        vim = fit_estimator(r, "vim", {"dim": 8})
    means, classes, precision = class_gaussian(x, y)
    np.testing.assert_allclose(maha.means_, means, rtol=1e-12)
    np.testing.assert_allclose(maha.precision_, precision, rtol=1e-8, atol=1e-10 * np.abs(precision).max())
    assert float(react.threshold_) == np.percentile(x.ravel(), 83.0)     # exact, not approximate
    u = -np.linalg.pinv(w) @ b
    vals, vecs = np.linalg.eigh((x - u).T @ (x - u) / len(x))
    residual = vecs[:, np.argsort(-vals)[8:]]
    # the residual subspace (not its basis) is what ViM uses: compare projectors
    np.testing.assert_allclose(vim.residual_ @ vim.residual_.T, residual @ residual.T, atol=1e-10)
    alpha = (x @ w.T + b).max(axis=1).mean() / np.linalg.norm((x - u) @ residual, axis=1).mean()
    assert abs(float(vim.alpha_) - alpha) <= 1e-10 * alpha


def test_exact_percentile_is_numpy_percentile_bit_for_bit():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 5000))
        x = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e4])).astype(np.float32)
        if trial % 3 == 0:
            x = np.maximum(x, 0)             # ReLU features: many exact zeros
        q = float(rng.choice([0.0, 50.0, 90.0, 99.9, 100.0, rng.uniform(0, 100)]))
        parts = np.array_split(x.astype(np.float64), int(rng.integers(1, 7)))
        assert exact_percentile(lambda: iter(parts), q) == np.percentile(x.astype(np.float64), q)
    with pytest.raises(ValueError, match="float32"):
        exact_percentile(lambda: iter([np.array([0.1])]), 50)


def test_kth_nearest_over_chunks_matches_a_full_search():
    rng = np.random.default_rng(1)
    bank = np.abs(rng.standard_normal((3000, 40)))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = np.abs(rng.standard_normal((200, 40)))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for k in (1, 7, 50):
        want = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank).kneighbors(q)[0][:, -1]
        got = kth_nearest(q, np.array_split(bank, 11), k)
        assert np.abs(got ** 2 - want ** 2).max() <= 1e-6
    with pytest.raises(ValueError, match="bank of 5 rows"):
        kth_nearest(q, [bank[:5]], 7)


def test_fit_memory_does_not_grow_with_the_training_set(tmp_path, monkeypatch):
    """Peak traced memory of a fit on 4x the rows stays within 1.3x (blocks of 500 rows):
    what grows is the data read, not what is held."""
    monkeypatch.setattr(data_module, "FIT_BLOCK_BYTES", 500 * 8 * (64 + 20))
    small = write_synthetic(str(tmp_path / "a_train.h5"), 4000, num_classes=20, dim=64, seed=1, split="train")
    large = write_synthetic(str(tmp_path / "b_train.h5"), 16000, num_classes=20, dim=64, seed=1, split="train")
    assert "knn" in BOUNDED and "relation" not in BOUNDED
    for name in BOUNDED:
        peaks = []
        for path in (small, large):
            with CacheReader(path) as r:
                tracemalloc.start()
                fit_estimator(r, name)
                peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
        # labels and skipped flags (9 bytes a row) are read whole: allow them
        assert peaks[1] <= 1.3 * peaks[0] + 9 * 16000 * 2, (name, peaks)


def test_knn_bank_is_held_on_disk_and_alpha_subsamples(caches):
    train, test, _ = caches
    with CacheReader(train) as r:
        full = fit_estimator(r, "knn")
        sub = fit_estimator(r, "knn", {"alpha": 0.1, "seed": 3})
        again = fit_estimator(r, "knn", {"alpha": 0.1, "seed": 3})
        other = fit_estimator(r, "knn", {"alpha": 0.1, "seed": 4})
        x = r.read_all("features").astype(np.float64)
    assert len(full.bank_rows_) == 3000 and len(sub.bank_rows_) == 300
    assert isinstance(full.bank_, np.memmap) and full.bank_.shape == (3000, 24)
    np.testing.assert_array_equal(sub.bank_rows_, again.bank_rows_)
    assert not np.array_equal(sub.bank_rows_, other.bank_rows_)
    assert "alpha" in entry("knn").fit_params
    sub.k = 5                        # a scoring parameter: the same fit
    with CacheReader(test) as r:
        got = score_cache(r, "knn", sub)
        q = r.read_all("features").astype(np.float64)
    unit = lambda v: v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-10)
    want = NearestNeighbors(n_neighbors=5).fit(unit(x[sub.bank_rows_])).kneighbors(unit(q))[0][:, -1]
    assert np.abs(got ** 2 - want ** 2).max() <= 1e-6


def test_saved_fits_are_memory_mapped_and_score_the_same(caches, tmp_path):
    train, test, _ = caches
    store = FitStore(str(tmp_path / "fitted"))
    with CacheReader(train) as r:
        first = store.get(r, "mahalanobis")
        again = store.get(r, "mahalanobis")
        nac = store.get(r, "nac")
        nac_again = store.get(r, "nac")
    assert isinstance(again.precision_, np.memmap) and not isinstance(first.precision_, np.memmap)
    assert (tmp_path / "fitted" / "mahalanobis" / "key.json").exists()
    assert isinstance(nac_again.counts_["avgpool"], np.memmap)
    with CacheReader(test) as r:
        np.testing.assert_array_equal(score_cache(r, "mahalanobis", first), score_cache(r, "mahalanobis", again))
        np.testing.assert_array_equal(score_cache(r, "nac", nac), score_cache(r, "nac", nac_again))


def test_gemm_distances_equal_the_per_class_form():
    rng = np.random.default_rng(2)
    x, means = rng.standard_normal((50, 16)) + 2, rng.standard_normal((7, 16)) + 2
    a = rng.standard_normal((16, 16))
    p = a @ a.T
    want = np.stack([np.einsum("nd,de,ne->n", x - m, p, x - m) for m in means], axis=1)
    np.testing.assert_allclose(sq_distances(x, means, p), want, rtol=1e-10)


def test_float_datasets_are_stored_uncompressed_with_checksums(caches):
    train, _, _ = caches
    with h5py.File(train, "r") as f:
        for name in ("features", "logits"):
            assert f[name].compression is None and f[name].fletcher32
            assert f[name].chunks[1:] == f[name].shape[1:]        # chunks of whole rows
        assert f["labels"].compression == "gzip" and f["labels"].fletcher32


def test_caches_of_the_gzip_layout_stay_readable(caches, tmp_path):
    train, _, _ = caches
    old = str(tmp_path / "old.h5")
    with h5py.File(train, "r") as src, h5py.File(old, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                kw = dict(compression="gzip", compression_opts=1, shuffle=True, fletcher32=True,
                          chunks=obj.chunks) if obj.chunks and obj.dtype.kind == "f" else {}
                dst.create_dataset(name, data=obj[...], dtype=obj.dtype, **kw)
        src.visititems(copy)
    with CacheReader(old) as a, CacheReader(train) as b:
        np.testing.assert_array_equal(a.read_all("features"), b.read_all("features"))
        assert fit_estimator(a, "react").threshold_ == fit_estimator(b, "react").threshold_
