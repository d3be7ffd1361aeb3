"""SCALE (Xu et al., ICLR 2024; code kai422/SCALE ``scale_net.py``): the pooled
penultimate activation (the same (N, C, 1, 1) tensor ASH shapes) is multiplied, unpruned,
by exp(s1 / s2), s1 the sum of all its entries and s2 the sum of its top k = n - round(n p
/ 100) entries; then the head and the energy. Percentile 85 (the release's config and
OpenOOD's ``scale.yml``); OpenOOD searches 65..95. pytorch-ood states the percentile as a
fraction (0.65 by default)."""
import numpy as np

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score

from .ash import kept_entries


@register_score("scale", linear_head=True, default=True, title="SCALE", family="features", reference="Xu et al., ICLR 2024; kai422/SCALE",
                paper={"SCALE (p=85)": {}}, grid=[{"percentile": [65, 70, 75, 80, 85, 90, 95]}])
def scale(data, percentile=85.0):
    """(n,) float64 energy of the head on the scaled (not pruned) pooled features."""
    x = data.features
    _, kept = kept_entries(x, percentile)
    scaled = x * np.exp(x.sum(axis=1) / kept.sum(axis=1))[:, None]
    return logsumexp(scaled @ data.head_weight.T + data.head_bias)
