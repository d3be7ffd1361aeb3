"""KNN (Sun et al., ICML 2022; deeplearning-wisc/knn-ood): minus the Euclidean distance
to the k-th nearest L2-normalised ID training feature (x / (||x|| + 1e-10), the release's
normalisation); k = 50 for CIFAR in the paper (1000 for ImageNet). faiss in the release
returns squared distances: the same ranking.
"""
import numpy as np
from sklearn import config_context
from sklearn.neighbors import NearestNeighbors

from analyze.registry import register_score


def normalise(x):
    """Rows divided by their L2 norm (+1e-10, as the KNN release)."""
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


@register_score("knn", title="KNN", family="features", default=True, fit_params=(),
                reference="Sun et al., ICML 2022", paper={"KNN (k=50)": {}},
                grid=[{"k": [1, 5, 10, 50, 100]}])
class KNN:
    """Fitted: ``bank_`` (n_train, D) normalised training features (independent of k)."""

    def __init__(self, k=50):
        self.k = k

    def fit(self, data):
        self.bank_ = normalise(data.features)
        return self

    def score(self, data):
        """(n,) float64 minus the distance to the k-th nearest training feature."""
        if not 1 <= self.k <= len(self.bank_):
            raise ValueError(f"knn.k={self.k} must be between 1 and the {len(self.bank_)} training samples")
        with config_context(working_memory=128):   # distance matrix chunks of at most 128 MiB
            nn = NearestNeighbors(n_neighbors=self.k, algorithm="brute").fit(self.bank_)
            dist, _ = nn.kneighbors(normalise(data.features))
        return -dist[:, -1]
