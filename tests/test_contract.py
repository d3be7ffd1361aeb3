"""The contract every registered score keeps, checked over the whole registry (as
scikit-learn's ``parametrize_with_checks``): no score is listed by hand here.

On small caches (each score on the first of these that serves it: a synthetic world with
full-rank features and a head whose predictions spread over the classes, for the scores
that read only logits, features and the head; else caches extracted from one small model
for every score at once, a CIFAR ResNet-20 with random norm layers, 120 training rows and
32 ID and 32 shifted rows):

* ``score`` returns (n,) float64, finite on every usable row;
* one block gives the same scores as many (fits and scoring streamed in small blocks), to
  1e-5 of the largest score: sums in another order, and float32 GEMMs (KNN, as faiss)
  whose rounding depends on the query block's size;
* ``fit`` returns self and sets only attributes whose names end in ``_``;
* a saved fit reloads (memory-mapped) to identical scores and holds what it needs:
  scoring opens no cache but the one scored;
* a score that reads the head's weight or bias declares ``linear_head`` (so a model
  without a linear head refuses it by name); a declared one that does not read them is a
  closed-form last-layer gradient, which assumes logits = W x + b (``CLOSED_FORM``).

And on synthetic caches whose OOD rows are far from every class (trivially separable),
every score they can serve ranks the ID rows higher (AUROC above 0.9): higher means more
in-distribution.
"""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gradood.analyze.data as data_module
import gradood.analyze.fitting as fitting_module
import gradood.store.reader as reader_module
from gradood.analyze.data import CacheData
from gradood.analyze.engine import Engine, metric_summary
from gradood.analyze.fitting import FitStore, fit_estimator, score_cache
from gradood.analyze.registry import all_entries, entry
from gradood.extract.adapters import adapter_for
from gradood.extract.cli_support import _maha_setup
from gradood.extract.models import build_model
from gradood.store.reader import CacheReader
from gradood.store.synthetic import write_synthetic
from bench.helpers import extract_tensor, randomize_norms

SCORES = list(all_entries())
# declare ``linear_head`` without reading the head: their closed forms hold for logits W x + b only
CLOSED_FORM = {"gradnorm", "gradnorm_kl", "grad_uncertainty", "gradorth"}


def contract_params(name, folder):
    """The parameters a score runs with here: its defaults, except what the tiny fixture
    cannot hold (WeightedEBO reads its class weights from a file; the Mahalanobis
    ensemble's regression takes 2m validation rows)."""
    if name == "webo":
        return {"weights": os.path.join(folder, "webo_weights.npy")}
    if name == "mahalanobis_ens":
        return {"m": 8}
    return {}


@pytest.fixture(scope="session")
def extracted(tmp_path_factory):
    """``folder`` with ``test.h5`` (ID) and ``shifted.h5`` extracted for every registered
    score (every pass, the Mahalanobis pass with pseudo-OOD copies at one magnitude), and
    ``test_train.h5`` for every fitted one."""
    folder = str(tmp_path_factory.mktemp("contract"))
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet20", 10))
    g = torch.Generator().manual_seed(3)
    train = torch.randn(120, 3, 32, 32, generator=g)
    labels = torch.arange(120) % 10
    test = torch.randn(32, 3, 32, 32, generator=g)
    shifted = 2.5 * torch.randn(32, 3, 32, 32, generator=g) + 0.5
    fitted = [n for n in SCORES if entry(n).fitted and n != "mahalanobis_ens"]   # what a training cache serves
    params = {n: contract_params(n, folder) for n in SCORES}
    np.save(params["webo"]["weights"], np.linspace(0.5, 1.5, 10))
    train_path = extract_tensor(model, "resnet20", train, os.path.join(folder, "test_train.h5"), fitted,
                                batch_size=40, name="test_train", labels=labels, params=params)
    maha = _maha_setup(adapter_for(model, (3, 32, 32)), "test", {"name": "none"}, torch.device("cpu"),
                       SimpleNamespace(maha_fit=train_path, maha_magnitudes=[0.0], maha_adversarial=True))
    for name, images in (("test", test), ("shifted", shifted)):
        extract_tensor(model, "resnet20", images, os.path.join(folder, f"{name}.h5"), SCORES, batch_size=16,
                       name=name, labels=torch.arange(32) % 10, maha=maha, params=params)
    return folder, params


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A synthetic world (``store.synthetic``): 6 classes, 64 full-rank features, 600
    training rows, 40 test rows near the class centres and 40 far from them."""
    d = str(tmp_path_factory.mktemp("world"))
    write_synthetic(os.path.join(d, "test_train.h5"), 600, num_classes=6, dim=64, seed=1, noise=0.5, split="train")
    write_synthetic(os.path.join(d, "test.h5"), 40, num_classes=6, dim=64, seed=2, noise=0.5)
    write_synthetic(os.path.join(d, "shifted.h5"), 40, num_classes=6, dim=64, seed=3, noise=0.5, novel=0.5)
    np.save(os.path.join(d, "webo_weights.npy"), np.linspace(0.5, 1.5, 6))
    return d


@pytest.fixture(scope="session")
def caches(world, extracted):
    """``{score: (folder, params)}``: the world where it serves the score, else the
    extracted caches."""
    folder, _ = extracted
    out = {}
    with Engine(world, "test") as synthetic, Engine(folder, "test") as real:
        for name in SCORES:
            on_world = contract_params(name, world)
            if not synthetic.why_not(name, on_world, ["shifted"]):
                out[name] = (world, on_world)
            else:
                params = contract_params(name, folder)
                assert real.why_not(name, params, ["shifted"]) == "", name
                out[name] = (folder, params)
    return out


def test_both_worlds_are_used(caches, world):
    on_world = [n for n, (f, _) in caches.items() if f == world]
    assert 25 <= len(on_world) < len(SCORES)


@pytest.mark.parametrize("name", SCORES)
def test_score_contract(caches, name, monkeypatch, tmp_path):
    folder, params = caches[name]
    e = entry(name)
    reads = []
    original = CacheData._head
    monkeypatch.setattr(CacheData, "_head", lambda self: reads.append(1) or original(self))
    engine = Engine(folder, "test")
    source = engine.fit_source(name, params)
    with CacheReader(os.path.join(folder, "shifted.h5")) as shifted:
        # fit returns self and sets only fitted attributes (names ending in "_")
        if e.fitted:
            with CacheReader(os.path.join(folder, f"{source}.h5")) as fit_reader:
                est = e.make(params)
                before = set(vars(est))
                keep = ~fit_reader.read_all("skipped").astype(bool)
                data = CacheData(fit_reader, 0, fit_reader.n_samples, keep=keep, needs=e.needs_for(params),
                                 passes=e.passes, score=name)
                assert est.fit(data) is est
                added = set(vars(est)) - before
                assert added and all(a.endswith("_") for a in added), sorted(added)
                one = fit_estimator(fit_reader, name, params)
        else:
            one = e.make(params)
        # (n,) float64, finite
        raw = one.score(CacheData(shifted, 0, shifted.n_samples, needs=e.needs_for(params), passes=e.passes,
                                  score=name))
        assert isinstance(raw, np.ndarray) and raw.dtype == np.float64 and raw.shape == (shifted.n_samples,)
        assert np.isfinite(raw).all()
        whole = score_cache(shifted, name, one, params)
        np.testing.assert_array_equal(whole, raw)
        # one block = many blocks (fit and scoring)
        monkeypatch.setattr(data_module, "FIT_BLOCK_BYTES", 1)
        monkeypatch.setattr(fitting_module, "BLOCK_ROWS", 5)
        if e.fitted:
            with CacheReader(os.path.join(folder, f"{source}.h5")) as fit_reader:
                many = fit_estimator(fit_reader, name, params)
        else:
            many = e.make(params)
        blocked = score_cache(shifted, name, many, params)
        np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
        monkeypatch.undo()
    assert bool(reads) == (e.reads_head(params) and name not in CLOSED_FORM), (name, len(reads))
    if not e.fitted:
        return
    # a saved fit reloads to identical scores and opens no cache but the one scored
    store = FitStore(str(tmp_path / "fitted"))
    with CacheReader(os.path.join(folder, f"{source}.h5")) as fit_reader:
        store.get(fit_reader, name, params)
        reloaded = store.get(fit_reader, name, params)
    arrays = [v for v in _arrays(reloaded) if np.ndim(v)]
    assert all(isinstance(v, np.memmap) for v in arrays)
    with CacheReader(os.path.join(folder, "shifted.h5")) as shifted:
        def refuse(self, path, allow_partial=False):
            raise AssertionError(f"{name} opened {path} while scoring")
        monkeypatch.setattr(reader_module.CacheReader, "__init__", refuse)
        again = score_cache(shifted, name, reloaded, params)
    np.testing.assert_array_equal(again, whole)


def _arrays(estimator):
    for key, value in vars(estimator).items():
        if key.endswith("_"):
            yield from (value.values() if isinstance(value, dict) else [value])


@pytest.fixture(scope="session")
def separable(tmp_path_factory):
    """Synthetic caches of one world: ID training and test rows near their class centres,
    OOD rows around other centres, all with little noise."""
    d = str(tmp_path_factory.mktemp("separable"))
    write_synthetic(os.path.join(d, "id_train.h5"), 600, num_classes=6, dim=64, seed=1, noise=0.05, split="train")
    write_synthetic(os.path.join(d, "id.h5"), 120, num_classes=6, dim=64, seed=2, noise=0.05)
    write_synthetic(os.path.join(d, "far.h5"), 120, num_classes=6, dim=64, seed=3, noise=0.05, novel=1.0)
    return d


def test_higher_means_more_in_distribution(separable):
    """Every score the synthetic caches serve ranks the ID rows above the far OOD rows."""
    weights = os.path.join(separable, "webo.npy")
    np.save(weights, np.ones(6))
    with Engine(separable, "id") as engine:
        params = {"webo": {"weights": weights}}
        served, _ = engine.servable(SCORES, params, ["far"])
        assert len(served) >= 30
        aurocs = {}
        for name in served:
            scored = engine.score_sets(name, params.get(name), ["id", "far"])
            aurocs[name] = metric_summary(scored, "id", ["far"])["far"]["AUROC"]
    low = {n: round(a, 3) for n, a in aurocs.items() if a <= 0.9}
    assert low == {}
