"""Mahalanobis, feature level (Lee et al., NeurIPS 2018), without input preprocessing:
class means and one shared covariance of the ID training features (the covariance of
the class-centred rows divided by n, as scikit-learn's ``EmpiricalCovariance`` in their
``sample_estimator``); score ``max_c -0.5 (x - mu_c)^T P (x - mu_c)`` with P the
pseudo-inverse of the covariance (``get_Mahalanobis_score`` at noise 0). pytorch-ood's
version omits the 1/n of the covariance (a constant factor; same ranking).
"""
import numpy as np

from analyze.registry import register_score
from store.gaussian import class_gaussian


@register_score("mahalanobis", title="Mahalanobis", family="features", default=True,
                reference="Lee et al., NeurIPS 2018", paper={"Mahalanobis": {}})
class Mahalanobis:
    """Fitted: ``means_`` (K', D), ``classes_`` (K',), ``precision_`` (D, D)."""

    def fit(self, data):
        self.means_, self.classes_, self.precision_ = class_gaussian(data.features, data.labels, f"mahalanobis fitted on {data.path}")
        return self

    def score(self, data):
        """(n,) float64 max over classes of -0.5 * squared Mahalanobis distance."""
        x = data.features
        best = np.full(len(x), -np.inf)
        for mu in self.means_:
            d = x - mu
            best = np.maximum(best, -0.5 * np.einsum("nd,de,ne->n", d, self.precision_, d))
        return best
