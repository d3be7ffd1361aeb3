"""Mahalanobis, feature level (Lee et al., NeurIPS 2018), without input preprocessing:
class means and one shared covariance of the ID training features (the covariance of
the class-centred rows divided by n, as scikit-learn's ``EmpiricalCovariance`` in their
``sample_estimator``); score ``max_c -0.5 (x - mu_c)^T P (x - mu_c)`` with P the
pseudo-inverse of the covariance (``get_Mahalanobis_score`` at noise 0). pytorch-ood's
version omits the 1/n of the covariance (a constant factor; same ranking); OpenOOD's
``mds`` omits the 1/2, so its values are twice these (same ranking).

Fit streamed (``store.gaussian.ClassMoments``, block by block): peak memory O(K D + D^2)
float64 beside one block, whatever the number of training rows. Scoring by two GEMMs
(``store.gaussian.sq_distances``).
"""
from gradood.analyze.registry import register_score
from gradood.store.schema import CacheError
from gradood.analyze.streaming import class_moments
from gradood.store.gaussian import sq_distances


@register_score("mahalanobis", title="Mahalanobis", family="features", default=True, fit_memory="K D + D^2",
                reference="Lee et al., NeurIPS 2018", paper={"Mahalanobis": {}})
class Mahalanobis:
    """Fitted: ``means_`` (K', D), ``classes_`` (K',), ``precision_`` (D, D)."""

    def fit(self, data):
        if (data.labels < 0).any():
            raise CacheError(f"mahalanobis fitted on {data.path}: Mahalanobis needs labelled training samples")
        moments = class_moments(data)
        self.means_, self.classes_, self.precision_ = moments.gaussian(f"mahalanobis fitted on {data.path}")
        return self

    def score(self, data):
        """(n,) float64 max over classes of -0.5 * squared Mahalanobis distance."""
        return -0.5 * sq_distances(data.features, self.means_, self.precision_).min(axis=1)
