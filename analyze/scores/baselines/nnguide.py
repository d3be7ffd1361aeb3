"""NNGuide, nearest-neighbour guidance (Park et al., ICCV 2023; code roomo7time/nnguide
``nnguide.py``): a bank of L2-normalised training features each scaled by its energy
logsumexp(z); the guidance of a sample is the mean of its k largest inner products with
the bank (its own feature L2-normalised), and the score is guidance * logsumexp(z).
The release's bank is a seeded random 1% of the training set and k = 10; OpenOOD takes
the first ~1% of its training loader and k = 100. Here the bank is a seeded random
``fraction`` of the training cache (at least k rows), gathered block by block (memory:
the bank, fraction x n x D)."""
import numpy as np

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import gather


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)   # F.normalize


@register_score("nnguide", default=True, fit_memory="fraction n D", title="NNGuide", family="features", fit_params=("fraction", "seed", "k"),
                reference="Park et al., ICCV 2023; roomo7time/nnguide", paper={"NNGuide (k=10, 1%)": {}},
                grid=[{"k": [1, 5, 10, 50, 100]}])
class NNGuide:
    """Fitted: ``bank_`` (m, D) energy-scaled normalised training features."""

    def __init__(self, k=10, fraction=0.01, seed=0):
        self.k, self.fraction, self.seed = k, fraction, seed

    def fit(self, data):
        if not 0 < self.fraction <= 1 or self.k < 1:
            raise ValueError(f"nnguide needs 0 < fraction <= 1 and k >= 1, got {self.fraction}, {self.k}")
        n = data.n
        m = min(n, max(self.k, int(round(n * self.fraction))))
        rows = np.sort(np.random.default_rng(self.seed).choice(n, m, replace=False))
        self.bank_ = gather(data, rows, lambda b: _unit(b.features) * logsumexp(b.logits)[:, None])
        return self

    def score(self, data):
        """(n,) float64 guidance times energy."""
        k = min(self.k, len(self.bank_))
        sims = _unit(data.features) @ self.bank_.T
        guidance = -np.sort(-sims, axis=1)[:, :k].mean(axis=1)
        return guidance * logsumexp(data.logits)
