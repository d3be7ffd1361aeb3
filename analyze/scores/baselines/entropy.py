"""Entropy of the softmax (a classic baseline; pytorch-ood ``Entropy``; the GEN release's
``shannon_entropy``): S = sum_k p_k log p_k, minus the Shannon entropy (higher = more
confident = more in-distribution). Computed from the log-softmax, so no clipping is
needed (pytorch-ood clips p at 1e-7; the ranking only differs where p underflows).
OpenOOD v1.5 has no entropy postprocessor."""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score


@register_score("entropy", default=True, title="Entropy", family="logits", reference="Shannon entropy of the softmax",
                paper={"Entropy": {}})
def entropy(data):
    """(n,) float64 sum_k p_k log p_k."""
    lp = log_softmax(data.logits)
    return (np.exp(lp) * lp).sum(axis=1)
