"""VRA, variational rectified activation (Xu et al., NeurIPS 2023) as OpenOOD runs it
(``vra_postprocessor.py``, ``configs/postprocessors/vra.yml``): the penultimate features are
clipped to [t_low, t_high], the ``percentile_low``-th (10) and ``percentile_high``-th (90)
percentiles of every entry of the fitting cache's features, and scored by the energy
logsumexp(W clip(x) + b).

The paper's VRA-P also zeroes entries below t_low and adds a constant to the kept band;
OpenOOD's code, the public implementation, clips only, and that is what is computed here.
OpenOOD fits the percentiles on its ID validation split; here the fitting cache is
``--fit-on`` (the ID training cache by default), as for ReAct. Both percentiles are exact
and streamed (``analyze.streaming.exact_percentile``), equal to ``np.percentile`` over
every entry. Reads features and the head; costs nothing at extraction.
"""
import numpy as np

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import exact_percentile


@register_score("vra", linear_head=True, title="VRA", family="features", fit_memory="65,536 counts",
                reference="Xu et al., NeurIPS 2023; OpenOOD vra_postprocessor.py",
                paper={"VRA (10, 90)": {}},
                grid=[{"percentile_high": [85, 90, 95, 99], "percentile_low": [1, 5, 10, 15]}])
class VRA:
    """Fitted: ``low_`` () and ``high_`` (), the clipping bounds."""

    def __init__(self, percentile_low=10.0, percentile_high=90.0):
        self.percentile_low = percentile_low
        self.percentile_high = percentile_high

    def fit(self, data):
        for name in ("percentile_low", "percentile_high"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"vra.{name} must be in [0, 100], got {getattr(self, name)}")
        features = lambda: (b.features for b in data.blocks())
        self.low_ = np.array(exact_percentile(features, self.percentile_low))
        self.high_ = np.array(exact_percentile(features, self.percentile_high))
        return self

    def score(self, data):
        """(n,) float64 energy of the head on the clipped features."""
        x = np.clip(data.features, float(self.low_), float(self.high_))
        return logsumexp(x @ data.head_weight.T + data.head_bias)
