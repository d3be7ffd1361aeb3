"""Multi-layer Mahalanobis without input preprocessing, as pytorch-ood's
``MultiMahalanobis`` (``detector/mmahalanobis.py``; after Lee et al., NeurIPS 2018): per
layer, the spatial means of its output; class means and one shared matrix, the summed
class-centred scatter plus 1e-6 I (not divided by n, as pytorch-ood's current version; a
2024 development version divided by n - 1: a constant factor), inverted exactly; score =
-sum over layers of 0.5 min_c (f - mu_c)^T P (f - mu_c) (each layer takes its own nearest
class; pytorch-ood returns the sum as an outlier score, negated here), layers weighted
equally (pytorch-ood's default alpha). The layers are the model's stage outputs (the
``nac`` hook set, extraction records their spatial means) and the pooled penultimate
feature, as pytorch-ood's WRN example (conv1, block1-3, relu(bn1)). No official code
exists for this combination; Lee et al.'s own ensemble with input preprocessing and a
logistic regression is ``mahalanobis_ens``. pytorch-ood computes in float32: run on
the same model its scores differ from these (float64) by up to 1.5e-4 relative; in float64
the two agree to 5e-7. Fit streamed: per layer O(K C + C^2)."""
import numpy as np

from gradood.analyze.registry import register_score
from gradood.analyze.streaming import class_moments
from gradood.store.gaussian import sq_distances
from gradood.store.schema import CacheError

FEATURES = "features"
RIDGE = 1e-6


def _vectors(block, layer):
    return block.features if layer == FEATURES else block.stat(layer, "act", "mean")


@register_score("multimahalanobis", default=False, title="MultiMahalanobis", family="features",
                needs=[("nac", "act", "mean")], fit_memory="sum over layers of K C + C^2",
                reference="pytorch-ood MultiMahalanobis (after Lee et al., NeurIPS 2018)",
                paper={"MultiMahalanobis (stages + features)": {}})
class MultiMahalanobis:
    """Fitted: ``means_`` {layer: (K', C)}, ``precision_`` {layer: (C, C)}."""

    def fit(self, data):
        if (data.labels < 0).any():
            raise CacheError(f"multimahalanobis fitted on {data.path}: needs labelled training samples")
        self.means_, self.precision_ = {}, {}
        for layer in [*data.layers("nac"), FEATURES]:
            moments = class_moments(data, get=lambda b, layer=layer: _vectors(b, layer))
            c = moments.scatter.shape[0]
            self.means_[layer] = moments.means[moments.classes]
            self.precision_[layer] = np.linalg.inv(moments.scatter + RIDGE * np.eye(c))
        return self

    def score(self, data):
        """(n,) float64 minus the summed half squared distances to each layer's nearest class."""
        total = np.zeros(data.n)
        for layer, means in self.means_.items():
            total -= 0.5 * sq_distances(_vectors(data, layer), means, self.precision_[layer]).min(axis=1)
        return total
