"""DICE, directed sparsification (Sun & Li, ECCV 2022; code deeplearning-wisc/dice
``route.py`` ``RouteDICE``): the head's weight W (K, D) is masked to the entries whose
contribution mean(x_train)_d * W_kd (signed) is above the p-th percentile of all K*D
contributions (strict ``>``), then the energy logsumexp(x (W * mask)^T + b). The mean is
over the ID training features (fitted on the training cache). p = 90 (the release's CIFAR
setting and OpenOOD's for every benchmark; the release uses 70 for ImageNet, which the
ImageNet preset sets)."""
import numpy as np

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import feature_mean


@register_score("dice", linear_head=True, default=True, fit_memory="D", title="DICE", family="features", fit_params=(),
                reference="Sun & Li, ECCV 2022; deeplearning-wisc/dice", paper={"DICE (p=90)": {}},
                grid=[{"p": [10, 30, 50, 70, 90]}])
class DICE:
    """Fitted: ``mean_`` (D,), the mean training feature."""

    def __init__(self, p=90.0):
        self.p = p

    def fit(self, data):
        self.mean_ = feature_mean(data)
        return self

    def score(self, data):
        """(n,) float64 energy of the sparsified head."""
        if not 0 <= self.p < 100:
            raise ValueError(f"dice.p must be in [0, 100), got {self.p}")
        w = data.head_weight
        contrib = self.mean_[None, :] * w
        mask = contrib > np.percentile(contrib, self.p)
        return logsumexp(data.features @ (w * mask).T + data.head_bias)
