"""RMDS, relative Mahalanobis distance (Ren et al., 2021, "A simple fix to Mahalanobis
distance for improving near-OOD detection"): class means and a shared covariance of the
ID training features, and one background Gaussian of all of them; score = max over
classes of -(MD_c(x) - MD_0(x)). Covariances as scikit-learn's ``EmpiricalCovariance``
(divided by n), precisions by pseudo-inverse, as OpenOOD's ``rmds_postprocessor``; no
official code was found. pytorch-ood's ``RMD`` omits the 1/n of both covariances and adds
1e-6 I: a common factor and a ridge."""
import numpy as np

from analyze.registry import register_score
from store.gaussian import class_gaussian


def _md(x, mean, precision):
    d = x - mean
    return np.einsum("nd,de,ne->n", d, precision, d)


@register_score("rmds", default=True, title="RMDS", family="features", reference="Ren et al., 2021 (relative Mahalanobis)",
                paper={"RMDS": {}})
class RMDS:
    """Fitted: ``means_`` (K', D), ``precision_`` (D, D), ``background_mean_`` (D,),
    ``background_precision_`` (D, D)."""

    def fit(self, data):
        x = data.features
        self.means_, _, self.precision_ = class_gaussian(x, data.labels, f"rmds fitted on {data.path}")
        self.background_mean_ = x.mean(axis=0)
        centred = x - self.background_mean_
        self.background_precision_ = np.linalg.pinv(centred.T @ centred / len(x), hermitian=True)
        return self

    def score(self, data):
        """(n,) float64 max_c -(MD_c - MD_0)."""
        x = data.features
        md0 = _md(x, self.background_mean_, self.background_precision_)
        return np.max([-_md(x, mu, self.precision_) for mu in self.means_], axis=0) + md0
