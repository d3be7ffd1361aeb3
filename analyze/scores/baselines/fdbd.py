"""fDBD, fast decision-boundary distance (Liu & Qin, ICML 2024; code litianliu/fDBD-OOD
``run_cifar.py``): the feature's distance to each decision boundary between the predicted
class and class c, |z_c - z_pred| / ||w_c - w_pred||, summed over c, divided by the
distance of the feature to the mean training feature ||x - mu_train|| (no epsilon; the
release sums, pytorch-ood averages over K - 1: same ranking). OpenOOD lets its parameter
search use ||x|| instead (``distance_as_normalizer=False``, followed here); pytorch-ood 0.4
has no such option."""
import numpy as np

from gradood.analyze.registry import register_score
from gradood.analyze.streaming import feature_mean


@register_score("fdbd", linear_head=True, default=True, fit_memory="D", title="fDBD", family="features", fit_params=(),
                reference="Liu & Qin, ICML 2024; litianliu/fDBD-OOD", paper={"fDBD": {}},
                grid=[{"distance_as_normalizer": [True, False]}])
class FDBD:
    """Fitted: ``mean_`` (D,), the mean training feature."""

    def __init__(self, distance_as_normalizer=True):
        self.distance_as_normalizer = distance_as_normalizer

    def fit(self, data):
        self.mean_ = feature_mean(data)
        return self

    def score(self, data):
        """(n,) float64 summed boundary distances over the feature's normaliser."""
        x, z, w = data.features, data.logits, data.head_weight
        denom = np.linalg.norm(w[None, :, :] - w[:, None, :], axis=2)      # (K, K): ||w_c - w_p||
        np.fill_diagonal(denom, 1.0)
        pred = z.argmax(axis=1)
        num = np.abs(z - z[np.arange(len(z)), pred][:, None])
        total = (num / denom[pred]).sum(axis=1)
        norm = np.linalg.norm(x - self.mean_ if self.distance_as_normalizer else x, axis=1)
        return total / norm
