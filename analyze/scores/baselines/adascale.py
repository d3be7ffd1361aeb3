"""AdaScale-A and AdaScale-L, adaptive activation / logit scaling (Regmi et al., 2025;
sudarshanregmi/adascale) as OpenOOD runs them (``adascale_postprocessor.py``,
``networks/adascale_net.py``, ``configs/postprocessors/adascale_{a,l}.yml``).

Reads the pooled features x and those of the perturbed input x' (the ``adascale``
extraction pass, ``extract.adascale``: one input-gradient backward and one forward per
batch). Per sample, with k1 = int(D k1 / 100) and k2 = int(D k2 / 100) and the indices of
the k1 (k2) largest entries of x: Q = sum of relu(x') over the first + lmbda * sum of
|x - x'| over the second. Fit: the empirical CDF F of Q over ``num_samples`` rows of the
fitting cache (a seeded draw; OpenOOD's unseeded ``randperm``, 5,000 rows of its ID
validation split; here the ID training cache unless ``--fit-on`` names another, which
must hold the pass too). Score: the per-sample percentile
p = low + (1 - F(Q)) (high - low) (defaults 75, 85); with a = relu(x), s1 its sum and s2
the sum of its k = D - round(D p / 100) largest entries, r = s1 / s2;
AdaScale-A: the energy of the head on x exp(r); AdaScale-L: the energy of the logits
W x + b times r^2.
"""
import numpy as np

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import gather

REFERENCE = "Regmi et al., 2025; sudarshanregmi/adascale; OpenOOD adascale_postprocessor.py"
# OpenOOD sweeps 36 (low, high) pairs with low < high; the product below is the valid part
# of it a grid table can hold.
GRID = [{"percentile_low": [60, 70, 75, 80], "percentile_high": [85, 90, 95, 99]}]


def _top_indices(x, k):
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def shift_statistic(x, xp, k1, k2, lmbda):
    """(n,) float64 Q: relu(x') summed over the k1 largest entries of x, plus lmbda times
    |x - x'| summed over its k2 largest; x, xp (n, D)."""
    d = x.shape[1]
    k1, k2 = int(d * k1 / 100), int(d * k2 / 100)
    top1, top2 = _top_indices(x, k1), _top_indices(x, k2)
    return (np.take_along_axis(np.maximum(xp, 0), top1, 1).sum(1)
            + lmbda * np.take_along_axis(np.abs(x - xp), top2, 1).sum(1))


def scale_ratio(x, percentiles):
    """(n,) float64 s1 / s2 of a = relu(x) with per-row k = D - round(D p / 100) kept entries."""
    a = np.maximum(x, 0)
    d = a.shape[1]
    k = d - np.round(d * percentiles / 100.0).astype(int)
    if (k < 1).any():
        raise ValueError(f"adascale: a percentile of {percentiles.max():g} keeps no entry of {d}; lower percentile_high")
    top = np.cumsum(-np.sort(-a, axis=1), axis=1)
    return a.sum(1) / top[np.arange(len(a)), k - 1]


class AdaScale:
    """Fitted: ``q_`` (m,) sorted Q of the fitting rows (their empirical CDF)."""

    logit_scaling = False

    def __init__(self, percentile_low=75.0, percentile_high=85.0, k1=5.0, k2=1.0, lmbda=10.0,
                 num_samples=5000, seed=0):
        self.percentile_low, self.percentile_high = percentile_low, percentile_high
        self.k1, self.k2, self.lmbda = k1, k2, lmbda
        self.num_samples, self.seed = num_samples, seed

    def _q(self, data):
        return shift_statistic(data.features, data.adascale_features, self.k1, self.k2, self.lmbda)

    def fit(self, data):
        if not 0 < self.percentile_low <= self.percentile_high < 100:
            raise ValueError("adascale needs 0 < percentile_low <= percentile_high < 100, got "
                             f"{self.percentile_low}, {self.percentile_high}")
        rows = np.sort(np.random.default_rng(self.seed).permutation(data.n)[:self.num_samples])
        self.q_ = np.sort(gather(data, rows, self._q))
        return self

    def score(self, data):
        """(n,) float64 energy of the adaptively scaled features (A) or logits (L)."""
        cdf = np.searchsorted(self.q_, self._q(data), side="right") / len(self.q_)
        p = self.percentile_low + (1 - cdf) * (self.percentile_high - self.percentile_low)
        x = data.features
        r = scale_ratio(x, p)
        if self.logit_scaling:
            return logsumexp(data.logits * (r ** 2)[:, None])
        return logsumexp((x * np.exp(r)[:, None]) @ data.head_weight.T + data.head_bias)


FIT = dict(family="features", passes=("adascale",), fit_memory="num_samples",
           fit_params=("k1", "k2", "lmbda", "num_samples", "seed"), reference=REFERENCE, grid=GRID)


@register_score("adascale_a", title="AdaScale-A", paper={"AdaScale-A (75, 85)": {}}, linear_head=True, **FIT)
class AdaScaleA(AdaScale):
    """AdaScale-A: the features scaled by exp(r)."""


@register_score("adascale_l", title="AdaScale-L", paper={"AdaScale-L (75, 85)": {}}, **FIT)
class AdaScaleL(AdaScale):
    """AdaScale-L: the logits scaled by r^2."""

    logit_scaling = True
