"""NCI, neural-collapse-inspired detection (Liu & Qin, "Detecting out-of-distribution
through the lens of neural collapse"; OpenOOD ``nci_postprocessor.py``, no other official
code was found): with mu the mean ID training feature and w the head's weight row of the
predicted class (logit argmax), score = w . (x - mu) / ||x - mu||_2 + alpha ||x||_1. As
OpenOOD: the weight row is not normalised (the first term is ||w|| times a cosine), the
bias is not used, no epsilon. alpha = 1e-4 (``nci.yml``), OpenOOD's sweep
[1e-4, 1e-3, 1e-2, 0.1]. OpenOOD computes in float32, here float64. pytorch-ood 0.4.0 ships an
NCI too; run on the demo classifier it equals this one to 2e-7 relative. Fit streamed: the mean only (memory D)."""
import numpy as np

from gradood.analyze.registry import register_score
from gradood.analyze.streaming import feature_mean


@register_score("nci", linear_head=True, default=True, title="NCI", family="features", fit_params=(), fit_memory="D",
                reference="Liu & Qin (neural collapse); OpenOOD nci_postprocessor", paper={"NCI (alpha=1e-4)": {}},
                grid=[{"alpha": [1e-4, 1e-3, 1e-2, 0.1]}])
class NCI:
    """Fitted: ``mean_`` (D,), the mean training feature."""

    def __init__(self, alpha=1e-4):
        self.alpha = alpha

    def fit(self, data):
        self.mean_ = feature_mean(data)
        return self

    def score(self, data):
        """(n,) float64 w_pred . (x - mu) / ||x - mu|| + alpha ||x||_1."""
        x = data.features
        w = data.head_weight[data.logits.argmax(axis=1)]
        centred = x - self.mean_
        return (w * centred).sum(axis=1) / np.linalg.norm(centred, axis=1) + self.alpha * np.abs(x).sum(axis=1)
