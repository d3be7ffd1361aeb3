"""ReAct (Sun et al., NeurIPS 2021): clip the penultimate features at the ``percentile``-th
percentile (default 90) of all ID training feature entries, then the energy
logsumexp(W min(x, c) + b). OpenOOD fits the percentile on its ID validation split; here
the fitting cache is ``--fit-on`` (the ID training cache by default). The percentile is
exact and streamed (``analyze.streaming.exact_percentile``: two passes over the blocks,
65,536 counts of memory), equal to ``np.percentile`` over every entry.
"""
import numpy as np

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import exact_percentile


@register_score("react", linear_head=True, title="ReAct", family="features", default=True, fit_memory="65,536 counts",
                reference="Sun et al., NeurIPS 2021", paper={"ReAct (p=90)": {}},
                grid=[{"percentile": [70, 80, 85, 90, 95, 99]}])
class ReAct:
    """Fitted: ``threshold_`` (), the clipping value."""

    def __init__(self, percentile=90.0):
        self.percentile = percentile

    def fit(self, data):
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"react.percentile must be in [0, 100], got {self.percentile}")
        self.threshold_ = np.array(exact_percentile(lambda: (b.features for b in data.blocks()), self.percentile))
        return self

    def score(self, data):
        """(n,) float64 energy of the head on the clipped features."""
        x = np.minimum(data.features, float(self.threshold_))
        return logsumexp(x @ data.head_weight.T + data.head_bias)
