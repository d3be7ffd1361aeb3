"""Multi-layer Mahalanobis with input preprocessing and its logistic-regression ensemble,
against a direct re-implementation of the GradNorm release's procedure."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegressionCV

from bench import authors_reference as ref
from types import SimpleNamespace

from gradood.analyze.metrics import fpr_at_recall
from gradood.extract.adapters import adapter_for
from gradood.extract.cli_support import _maha_setup
from bench.helpers import compute_score, fit_score
from gradood.store.gaussian import fit_layer_gaussians
from gradood.extract.models import build_model
from bench.helpers import extract_tensor, randomize_norms, rel_err
from gradood.store.reader import CacheReader
from gradood.store.schema import CacheError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
LAYERS = ["block1", "block2", "block3"]
MAGNITUDES = (0.0, 0.01, 0.0014)


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("maha")
    torch.manual_seed(0)
    model = randomize_norms(build_model("wrn_40_2", 4)).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    train_x = torch.rand(320, 3, 32, 32, generator=g)
    train_y = torch.arange(320) % 4
    test_x = torch.rand(24, 3, 32, 32, generator=g)
    test_y = torch.arange(24) % 4
    train = extract_tensor(model, "wrn_40_2", train_x, str(tmp / "train.h5"), ["msp"], hooks=["nac"],
                           policies={"*": "pooled"}, batch_size=64, labels=train_y, name="train")
    maha = _maha_setup(adapter_for(model, (3, 32, 32)), "test", {"name": "none"}, torch.device("cpu"),
                       SimpleNamespace(maha_fit=train, maha_magnitudes=MAGNITUDES, maha_adversarial=True))
    test = extract_tensor(model, "wrn_40_2", test_x, str(tmp / "val.h5"), ["msp"], batch_size=10,
                          labels=test_y, name="val", maha=maha)
    return model, (train_x, train_y), (test_x, test_y), train, test


def test_layer_gaussians_match_sample_estimator(setup):
    model, (train_x, train_y), _, train, _ = setup
    means, precisions = ref.maha_sample_estimator(model, train_x, train_y, LAYERS, 4)
    with CacheReader(train) as r:
        fitted = fit_layer_gaussians(r, LAYERS)
    for i in range(len(LAYERS)):
        np.testing.assert_allclose(fitted[f"means_{i}"], means[i].numpy(), rtol=1e-5, atol=1e-6)
        # float64 here, float32 features in the release: the precisions agree to ~1e-4
        assert rel_err(fitted[f"precision_{i}"], precisions[i].numpy().astype(np.float64)) < 1e-3


def test_cached_layer_scores_match_the_release_loop(setup):
    """The scoring procedure, given the same class Gaussians (float32, as the release's)."""
    model, _, (test_x, test_y), train, test = setup
    with CacheReader(train) as r:
        fitted = fit_layer_gaussians(r, LAYERS)
    means = [torch.from_numpy(fitted[f"means_{i}"]).float() for i in range(len(LAYERS))]
    precisions = [torch.from_numpy(fitted[f"precision_{i}"]).float() for i in range(len(LAYERS))]
    adv_x = ref.maha_adversarial(model, test_x, test_y)
    with CacheReader(test) as r:
        cached = r.read_all("mahalanobis/scores")
        cached_adv = r.read_all("mahalanobis/adversarial_scores")
        assert r.attrs["mahalanobis"]["layers"] == LAYERS
    assert cached.shape == (24, len(MAGNITUDES), len(LAYERS))
    for j, eps in enumerate(MAGNITUDES):
        want = ref.maha_layer_scores(model, test_x, LAYERS, means, precisions, eps)
        assert rel_err(cached[:, j], want) < 1e-5, eps
        want_adv = ref.maha_layer_scores(model, adv_x, LAYERS, means, precisions, eps)
        assert rel_err(cached_adv[:, j], want_adv) < 1e-5, eps
    # the perturbation moves the scores: magnitude 0.01 differs from 0
    assert np.abs(cached[:, 1] - cached[:, 0]).max() > 1e-3 * np.abs(cached[:, 0]).max()


def test_ensemble_fits_and_selects_as_the_release(setup):
    _, _, _, _, test = setup
    m = 10
    with CacheReader(test) as r:
        fitted = fit_score(r, "mahalanobis_ens", m=m)
        clean = r.read_all("mahalanobis/scores")[: 2 * m].astype(np.float32)
        adv = r.read_all("mahalanobis/adversarial_scores")[: 2 * m].astype(np.float32)
        scores = compute_score(r, "mahalanobis_ens", fitted)
        at_zero = compute_score(r, "mahalanobis_ens", fitted, magnitude=0.0)
    fprs = []
    y = np.r_[np.zeros(m), np.ones(m)]
    regs = []
    for j in range(len(MAGNITUDES)):
        reg = LogisticRegressionCV(n_jobs=-1).fit(np.concatenate([clean[:m, j], adv[:m, j]]), y)
        regs.append(reg)
        fprs.append(fpr_at_recall(-reg.predict_proba(clean[m:, j])[:, 1], -reg.predict_proba(adv[m:, j])[:, 1]))
    np.testing.assert_allclose(fitted.fpr_, fprs)
    best = int(np.argmin(fprs))            # argmin returns the first minimum, as `fpr < best_fpr`
    assert int(fitted.best_) == best
    with CacheReader(test) as r:
        all_rows = r.read_all("mahalanobis/scores").astype(np.float32)
    np.testing.assert_allclose(scores, -regs[best].predict_proba(all_rows[:, best])[:, 1], rtol=1e-6)
    np.testing.assert_allclose(at_zero, -regs[0].predict_proba(all_rows[:, 0])[:, 1], rtol=1e-6)


def test_ensemble_refuses_caches_without_copies_or_of_another_recipe(setup, tmp_path):
    model, _, (test_x, test_y), train, test = setup
    plain = extract_tensor(model, "wrn_40_2", test_x[:12], str(tmp_path / "plain.h5"), ["msp"],
                           batch_size=12, labels=test_y[:12], name="plain")
    with CacheReader(plain) as r, pytest.raises(CacheError, match="--maha-fit"):
        compute_score(r, "mahalanobis_ens", {})
    other = _maha_setup(adapter_for(model, (3, 32, 32)), "test", {"name": "none"}, torch.device("cpu"),
                        SimpleNamespace(maha_fit=train, maha_magnitudes=(0.0,), maha_adversarial=False))
    odd = extract_tensor(model, "wrn_40_2", test_x[:12], str(tmp_path / "odd.h5"), ["msp"], batch_size=12,
                         labels=test_y[:12], name="odd", maha=other)
    with CacheReader(odd) as r, pytest.raises(CacheError, match="pseudo-OOD"):
        fit_score(r, "mahalanobis_ens", m=5)
    with CacheReader(test) as v:
        fitted = fit_score(v, "mahalanobis_ens", m=10)
    with CacheReader(odd) as r, pytest.raises(CacheError, match="another --maha-fit or --maha-magnitude"):
        compute_score(r, "mahalanobis_ens", fitted)
