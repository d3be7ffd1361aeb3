"""LTS, logit scaling (Djurisic et al.; code andrijazz/lts ``lts.py``, ``ood_eval.py``): with
a = relu(x) the pooled penultimate feature, s1 the sum of its entries and s2 the sum of
its top k = D - round(D p / 100) entries (the ASH/SCALE count), the logits of the
unchanged feature are multiplied by (s1 / s2)^2 and scored by their energy
logsumexp(z (s1 / s2)^2). p = 95 (``lts@95``, every config of the release). OpenOOD has
no LTS; pytorch-ood's current ``LTS`` computes the same (as an outlier score, negated);
an earlier pytorch-ood version divided the logits by the factor instead, which is not
followed. Unfitted; reads logits and features."""
import numpy as np

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score

from .ash import kept_entries


@register_score("lts", default=True, title="LTS", family="features", reference="Djurisic et al. (logit scaling); andrijazz/lts",
                paper={"LTS (p=95)": {}}, grid=[{"percentile": [80, 85, 90, 95, 99]}])
def lts(data, percentile=95.0):
    """(n,) float64 energy of the logits scaled by (s1 / s2)^2 of the rectified features."""
    a = np.maximum(data.features, 0.0)
    _, kept = kept_entries(a, percentile)
    factor = (a.sum(axis=1) / kept.sum(axis=1)) ** 2
    return logsumexp(data.logits * factor[:, None])
