"""SHE, simplified Hopfield energy (Zhang et al., ICLR 2023; code
zjs975584714/SHE_ood_detection ``generate_stored_pattern.py``, ``simple_compute_score_HE``):
one stored pattern per class, the mean pooled feature of the training rows of that class
the classifier gets right; score = <x, pattern of the predicted class> (``metric``
inner_product, the default of the release and of OpenOOD; ``euclidean``: minus the
distance; ``cosine``: the cosine similarity)."""
import numpy as np

from gradood.analyze.registry import register_score
from gradood.analyze.streaming import group_means
from gradood.store.schema import CacheError

METRICS = ("inner_product", "euclidean", "cosine")


@register_score("she", default=True, fit_memory="K D", title="SHE", family="features", fit_params=(), choices={"metric": METRICS},
                reference="Zhang et al., ICLR 2023; zjs975584714/SHE_ood_detection", paper={"SHE": {}},
                grid=[{"metric": list(METRICS)}])
class SHE:
    """Fitted: ``patterns_`` (K, D), the mean correctly-classified training feature per class."""

    def __init__(self, metric="inner_product"):
        self.metric = metric

    def fit(self, data):
        k = data.num_classes

        def right_label(b):      # the label where the classifier is right, else -1
            return np.where(b.logits.argmax(axis=1) == b.labels, b.labels, -1)
        patterns, counts = group_means(data, lambda b: b.features, right_label, k)
        missing = [c for c in range(k) if not counts[c]]
        if missing:
            raise CacheError(f"{data.path}: SHE needs a correctly classified training row of every "
                             f"class; none for class(es) {missing[:10]} (a larger training cache helps)")
        self.patterns_ = patterns
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
