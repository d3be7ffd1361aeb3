"""Baselines and NAC-UE from the cache equal direct re-implementations of their definitions.

Each reference below runs the model itself (torch) and follows the paper / release
definition step by step; the cache-side scores never see the model.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance

from bench import authors_reference as ref
from bench.helpers import compute_score, fit_score
from gradood.extract.models import build_model
from bench.helpers import extract_tensor, randomize_norms, rel_err
from gradood.store.reader import CacheReader


def _images(n, size, seed):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def wrn(tmp_path_factory):
    """WRN-40-2 (128 features): 200 labelled training images, 16 test images, extracted."""
    torch.manual_seed(0)
    model = randomize_norms(build_model("wrn_40_2", 10))
    train, test = _images(200, 32, 1), _images(16, 32, 2) * 1.5
    labels = torch.arange(200) % 10
    d = tmp_path_factory.mktemp("wrn")
    scores = ["mahalanobis", "react", "knn", "vim", "ash", "ash_map"]
    tr = extract_tensor(model, "wrn_40_2", train, str(d / "train.h5"), scores, batch_size=50,
                        labels=labels, name="train")
    te = extract_tensor(model, "wrn_40_2", test, str(d / "test.h5"), scores, batch_size=8)
    feats = ref.penultimate(model, train), ref.penultimate(model, test)
    return model, (train, labels, test), (tr, te), feats


def _ours(paths, score, **params):
    tr, te = paths
    with CacheReader(tr) as t, CacheReader(te) as r:
        return compute_score(r, score, fit_score(t, score, **params), **params)


def test_mahalanobis_matches_lee_et_al(wrn):
    model, (train, labels, test), paths, ((xt, _), (xq, _)) = wrn
    xt, xq = xt.double().numpy(), xq.double().numpy()
    y = labels.numpy()
    means = np.stack([xt[y == c].mean(0) for c in range(10)])
    est = EmpiricalCovariance(assume_centered=False).fit(xt - means[y])
    expected = np.max([-0.5 * np.einsum("nd,de,ne->n", xq - m, est.precision_, xq - m) for m in means], axis=0)
    got = _ours(paths, "mahalanobis")
    assert rel_err(got, expected) <= 1e-6
    assert np.ptp(got) > 0


def test_react_clips_at_training_percentile(wrn):
    model, _, paths, ((xt, _), (xq, _)) = wrn
    for p in (90.0, 70.0):
        c = float(np.percentile(xt.numpy().ravel(), p))
        with torch.no_grad():
            expected = torch.logsumexp(model.fc(xq.clamp(max=c)).double(), dim=1).numpy()
        got = _ours(paths, "react", percentile=p)
        assert rel_err(got, expected) <= 1e-5


def test_knn_kth_neighbour_distance(wrn):
    _, _, paths, ((xt, _), (xq, _)) = wrn
    bank = F.normalize(xt.double(), dim=1)
    q = F.normalize(xq.double(), dim=1)
    for k in (1, 50):
        expected = torch.cdist(q, bank).sort(dim=1).values[:, k - 1].numpy()
        got = -_ours(paths, "knn", k=k)
        # the bank is searched in float32, as the release's faiss IndexFlatL2: squared
        # distances ||q||^2 + ||b||^2 - 2 q.b of unit vectors carry up to ~4 float32 ulps
        # of 1 (5e-7) of absolute rounding; in float64 the test's bound would be 1e-15
        assert np.abs(got ** 2 - expected ** 2).max() <= 1e-6
        assert rel_err(got, expected) <= 1e-3


def test_vim_matches_paper(wrn):
    model, _, paths, ((xt, zt), (xq, zq)) = wrn
    w, b = model.fc.weight.double().detach().numpy(), model.fc.bias.double().detach().numpy()
    xt, xq, zt, zq = (a.double().numpy() for a in (xt, xq, zt, zq))
    for dim in (64, 100):
        u = -np.linalg.pinv(w) @ b
        cov = EmpiricalCovariance(assume_centered=True).fit(xt - u).covariance_
        vals, vecs = np.linalg.eig(cov)
        ns = np.real(vecs.T[np.argsort(-np.real(vals))[dim:]].T)
        alpha = zt.max(1).mean() / np.linalg.norm((xt - u) @ ns, axis=1).mean()
        m = zq.max(1, keepdims=True)
        energy = (m[:, 0] + np.log(np.exp(zq - m).sum(1)))
        expected = energy - alpha * np.linalg.norm((xq - u) @ ns, axis=1)
        assert rel_err(_ours(paths, "vim", dim=dim), expected) <= 1e-5


@pytest.mark.parametrize("variant", ["ash_s", "ash_b", "ash_p"])
def test_ash_matches_release_placement(wrn, variant):
    """ASH as andrijazz/ash applies it: on the pooled (N, C, 1, 1) activation, then the head."""
    model, (_, _, test), paths, (_, (xq, _)) = wrn
    with torch.no_grad():
        for p in (90.0, 95.0, 65.0):
            shaped = ref.ash(xq.double()[:, :, None, None].clone(), p, variant)
            expected = torch.logsumexp(model.fc.double()(shaped.flatten(1)), dim=1).numpy()
            model.fc.float()
            with CacheReader(paths[1]) as r:
                got = compute_score(r, "ash", percentile=p, variant=variant)
            assert rel_err(got, expected) <= 1e-6
            with CacheReader(paths[1]) as r:      # the map placement is another method
                assert not np.allclose(compute_score(r, "ash_map", percentile=p, variant=variant), got)


@pytest.mark.parametrize("variant", ["ash_s", "ash_b", "ash_p"])
def test_ash_map_ablation_prunes_the_map(wrn, variant):
    model, (_, _, test), paths, _ = wrn
    with torch.no_grad():
        maps = ref.penultimate_map(model, test, "relu").double()
        for p in (90.0, 65.0):
            shaped = ref.ash(maps.clone(), p, variant)
            expected = torch.logsumexp(model.fc.double()(shaped.mean(dim=(2, 3))), dim=1).numpy()
            model.fc.float()
            with CacheReader(paths[1]) as r:
                got = compute_score(r, "ash_map", percentile=p, variant=variant)
            assert rel_err(got, expected) <= 1e-6


@pytest.fixture(scope="session")
def resnet(tmp_path_factory):
    """CIFAR ResNet-18: 40 labelled training images, 8 test images, with NAC hooks and ODIN."""
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    train, test = _images(40, 32, 3), _images(8, 32, 4)
    d = tmp_path_factory.mktemp("r18")
    pairs = [(1000.0, 0.0014), (10.0, 0.05), (1000.0, 0.0028, True), (1000.0, 0.0)]
    every = {"nac": {"layers": ["avgpool", "layer1", "layer2", "layer3", "layer4"]}}
    tr = extract_tensor(model, "resnet18", train, str(d / "train.h5"), ["nac", "odin"],
                        batch_size=8, labels=torch.arange(40) % 10, name="train", odin_pairs=pairs,
                        params=every)
    te = extract_tensor(model, "resnet18", test, str(d / "test.h5"), ["nac", "odin"],
                        batch_size=4, odin_pairs=pairs, params=every)
    return model, train, test, (tr, te), pairs


def test_odin_equals_per_batch_autograd(resnet):
    """Every recorded pass equals the release's separate forward-backward-forward; passes
    sharing a temperature share one backward and one batched perturbed forward (batched
    convolutions may round differently: 1e-5 relative)."""
    model, _, test, (_, te), pairs = resnet
    with CacheReader(te) as r:
        for t, eps, *std in pairs:
            divided = bool(std and std[0])
            expected = np.concatenate([ref.odin(model, test[i:i + 4], t, eps, (0.5, 0.5, 0.5) if divided else None)
                                       for i in range(0, 8, 4)])
            got = compute_score(r, "odin", temperature=t, epsilon=eps, std=divided)
            assert rel_err(got, expected) <= 1e-5
        # the input perturbation is really applied: epsilon 0 gives other scores
        assert not np.allclose(compute_score(r, "odin", temperature=10.0, epsilon=0.05),
                               ref.odin(model, test, 10.0, 0.0))
        # the std division really changes the step (0.0028 / 0.5 = 0.0056 per unit)
        assert not np.allclose(compute_score(r, "odin", temperature=1000.0, epsilon=0.0028, std=True),
                               ref.odin(model, test, 1000.0, 0.0028), rtol=1e-9, atol=0)
        # a temperature alone picks the first recorded pass at that temperature
        np.testing.assert_array_equal(compute_score(r, "odin", temperature=10.0),
                                      compute_score(r, "odin", temperature=10.0, epsilon=0.05))
        with pytest.raises(Exception, match="recorded: T=1000, eps=0.0014"):
            compute_score(r, "odin", temperature=5.0)


@pytest.mark.parametrize("layers,hyper", [
    (["avgpool"], None),                                    # the authors' CIFAR-10 default
    (["avgpool", "layer1", "layer2", "layer3", "layer4"],
     {"avgpool": (50, 2, 100.0), "layer1": (20, 3, 0.5), "layer2": (500, 1, 1.0),
      "layer3": (50, 2, 5.0), "layer4": (10, 1, 20.0)}),
])
def test_nac_matches_kmnc_estimator(resnet, layers, hyper):
    model, train, test, (tr, te), _ = resnet
    full = {l: (hyper or {}).get(l, (50, 50, 100.0)) for l in layers}
    expected = ref.nac(model, train, test, layers, full)
    with CacheReader(tr) as t, CacheReader(te) as r:
        fitted = fit_score(t, "nac", layers=layers, hyper=hyper)
        got = compute_score(r, "nac", fitted, layers=layers, hyper=hyper)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    if hyper:
        assert np.ptp(got) > 0
