"""SHE, simplified Hopfield energy (Zhang et al., ICLR 2023; code
zjs975584714/SHE_ood_detection ``generate_stored_pattern.py``, ``simple_compute_score_HE``):
one stored pattern per class, the mean pooled feature of the training rows of that class
the classifier gets right; score = <x, pattern of the predicted class> (``metric``
inner_product, the default of the release and of OpenOOD; ``euclidean``: minus the
distance; ``cosine``: the cosine similarity)."""
import numpy as np

from analyze.registry import register_score
from store.schema import CacheError

METRICS = ("inner_product", "euclidean", "cosine")


@register_score("she", default=True, title="SHE", family="features", fit_params=(), choices={"metric": METRICS},
                reference="Zhang et al., ICLR 2023; zjs975584714/SHE_ood_detection", paper={"SHE": {}},
                grid=[{"metric": list(METRICS)}])
class SHE:
    """Fitted: ``patterns_`` (K, D), the mean correctly-classified training feature per class."""

    def __init__(self, metric="inner_product"):
        self.metric = metric

    def fit(self, data):
        x, z, y = data.features, data.logits, data.labels
        right = z.argmax(axis=1) == y
        k = z.shape[1]
        missing = [c for c in range(k) if not (right & (y == c)).any()]
        if missing:
            raise CacheError(f"{data.path}: SHE needs a correctly classified training row of every "
                             f"class; none for class(es) {missing[:10]} (a larger training cache helps)")
        self.patterns_ = np.stack([x[right & (y == c)].mean(axis=0) for c in range(k)])
        return self

    def score(self, data):
        """(n,) float64 similarity to the predicted class's pattern."""
        x = data.features
        m = self.patterns_[data.logits.argmax(axis=1)]
        if self.metric == "inner_product":
            return (x * m).sum(axis=1)
        if self.metric == "euclidean":
            return -np.sqrt(((x - m) ** 2).sum(axis=1))
        return (x * m).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(m, axis=1))
