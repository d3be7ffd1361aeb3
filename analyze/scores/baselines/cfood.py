"""CFOOD, a conformal k-NN score, as OpenOOD runs it (``cfood_postprocessor.py``,
``configs/postprocessors/cfood.yml``; OpenOOD holds the only public code).

Fit, on the ID training cache: the penultimate features, L2-normalised
(x / (||x|| + 1e-10)); a reference set of n = int(alpha N) of them (all when alpha = 1),
drawn at random; a grid of neighbour fractions kappa (100 in [0.001, 0.1], 81 in
[0.105, 0.5], 49 in [0.51, 0.99]) with positions int(kappa n - 1), keeping only strictly
increasing positions; and, per reference row i and grid position j, the squared distance
from row i to its (pos_j + 1)-th nearest reference row (the sorted distances skipping
itself).

Score of a sample with squared distances d_i to the reference rows: per grid position j,
the share of reference rows whose own neighbour distance at j is at least d_i; kappa is
the first grid value where that share reaches ``k`` (1 where none does); the score is
-kappa (higher = more ID).

Differences from the release, by choice: the reference rows are a seeded numpy draw
(``seed``) where OpenOOD calls ``torch.randperm`` unseeded; distances are computed in
float64 from the cached float32 features (OpenOOD subtracts in float32), so a sample can
differ from the release by one grid step where a comparison falls within float32 rounding.
Fit memory: the reference set and its n x 230 distances; the self-distances are computed
in chunks of rows. Scoring is O(n x 230) per sample. Costs nothing at extraction.
"""
import numpy as np

from gradood.analyze.registry import register_score
from gradood.analyze.streaming import gather

CHUNK = 512         # rows of the n x n distance matrix (fit) or queries (scoring) at a time


def kappa_grid():
    """(230,) float64 neighbour fractions of the release, ascending."""
    return np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81),
                           np.linspace(0.51, 0.99, 49)))


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def _sq_dist(a, b, b_sq):
    """(len(a), len(b)) squared distances, clipped at 0 (the GEMM form; float64)."""
    return np.maximum((a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T), 0.0)


@register_score("cfood", title="CFOOD", family="features", fit_memory="alpha n (D + 230)",
                fit_params=("alpha", "seed"),
                reference="OpenOOD cfood_postprocessor.py (conformal k-NN)",
                paper={"CFOOD (alpha=0.1, k=0.01)": {}},
                grid=[{"alpha": [0.1, 0.5, 1.0], "k": [0.001, 0.005, 0.01, 0.05]}])
class CFOOD:
    """Fitted: ``ref_`` (n, D) normalised reference features, ``kappa_`` (J,) grid values,
    ``knn_`` (n, J) each reference row's squared neighbour distance at each grid position."""

    def __init__(self, alpha=0.1, k=0.01, seed=0):
        self.alpha, self.k, self.seed = alpha, k, seed

    def fit(self, data):
        if not 0 < self.alpha <= 1:
            raise ValueError(f"cfood.alpha must be in (0, 1], got {self.alpha}")
        total = data.n
        n = int(self.alpha * total) if self.alpha < 1 else total
        if n < 2:
            raise ValueError(f"cfood.alpha={self.alpha} keeps {n} of {total} training rows; it needs at least 2")
        rows = np.sort(np.random.default_rng(self.seed).permutation(total)[:n])
        self.ref_ = gather(data, rows, lambda b: _unit(b.features))
        kappa = kappa_grid()
        pos = (kappa * n - 1).astype(int)
        keep = np.concatenate(([True], pos[:-1] < pos[1:]))
        self.kappa_, pos = kappa[keep], pos[keep] + 1          # + 1 skips the row itself
        ref_sq = (self.ref_ ** 2).sum(1)
        self.knn_ = np.empty((n, len(pos)))
        for start in range(0, n, CHUNK):
            d = np.sort(_sq_dist(self.ref_[start:start + CHUNK], self.ref_, ref_sq), axis=1)
            self.knn_[start:start + CHUNK] = d[:, pos]
        return self

    def score(self, data):
        """(n,) float64 minus the first grid fraction at which the sample's share of
        reference rows reaches k."""
        ref_sq = (self.ref_ ** 2).sum(1)
        n = len(self.ref_)
        out = np.empty(data.n)
        feats = _unit(data.features)
        for start in range(0, data.n, CHUNK // 8):
            d = _sq_dist(feats[start:start + CHUNK // 8], self.ref_, ref_sq)      # (b, n)
            share = (self.knn_[None, :, :] >= d[:, :, None]).sum(1) / float(n)   # (b, J)
            hit = share >= self.k
            first = np.where(hit.any(1), hit.argmax(1), -1)
            out[start:start + len(d)] = -np.where(first >= 0, self.kappa_[np.maximum(first, 0)], 1.0)
        return out
