"""RMDS, relative Mahalanobis distance (Ren et al., 2021, "A simple fix to Mahalanobis
distance for improving near-OOD detection"): class means and a shared covariance of the
ID training features, and one background Gaussian of all of them; score = max over
classes of -(MD_c(x) - MD_0(x)). Covariances as scikit-learn's ``EmpiricalCovariance``
(divided by n), precisions by pseudo-inverse, as OpenOOD's ``rmds_postprocessor``; no
official code was found. pytorch-ood's ``RMD`` omits the 1/n of both covariances and adds
1e-6 I: a common factor and a ridge.

Fit streamed: the class moments and the background moments (all rows as one class) by
``store.gaussian.ClassMoments``, block by block; peak memory O(K D + D^2) float64.
Scoring by GEMMs (``store.gaussian.sq_distances``)."""
import numpy as np

from gradood.analyze.registry import register_score
from gradood.store.gaussian import ClassMoments, sq_distances
from gradood.store.schema import CacheError


@register_score("rmds", default=True, fit_memory="K D + 2 D^2", title="RMDS", family="features", reference="Ren et al., 2021 (relative Mahalanobis)",
                paper={"RMDS": {}})
class RMDS:
    """Fitted: ``means_`` (K', D), ``precision_`` (D, D), ``background_mean_`` (D,),
    ``background_precision_`` (D, D)."""

    def fit(self, data):
        if (data.labels < 0).any():
            raise CacheError(f"rmds fitted on {data.path}: Mahalanobis needs labelled training samples")
        classes, background = ClassMoments(), ClassMoments()
        for block in data.blocks():              # one read of the training cache for both
            if block.n:
                x = block.features
                classes.update(x, block.labels)
                background.update(x, np.zeros(block.n, np.int64))
        self.means_, _, self.precision_ = classes.gaussian(f"rmds fitted on {data.path}")
        self.background_mean_ = background.means[0]
        self.background_precision_ = np.linalg.pinv(background.scatter / background.n, hermitian=True)
        return self

    def score(self, data):
        """(n,) float64 max_c -(MD_c - MD_0)."""
        x = data.features
        md0 = sq_distances(x, self.background_mean_[None, :], self.background_precision_)[:, 0]
        return -sq_distances(x, self.means_, self.precision_).min(axis=1) + md0

