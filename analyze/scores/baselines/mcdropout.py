"""MC-Dropout (Gal & Ghahramani, ICML 2016) as OpenOOD runs it on a post-hoc classifier
(``dropout_postprocessor.py`` with ``networks/dropout_net.py``, ``dropout.yml``): T = 5
forward passes of the head on the penultimate features with dropout (p = 0.5, kept entries
scaled by 1 / (1 - p)), the mean of the T logit vectors, its maximum softmax probability.

OpenOOD calls ``F.dropout2d`` on the (N, D) features; torch treats a 2-D input as
unbatched channels-by-length and, as its warning says, that is element-wise dropout, which
is what is computed here (checked on torch 2.14). The masks come from numpy, one seeded
generator per cache row (``seed`` and the row index), so a row's score does not depend on
the blocks it is read in; they are not torch's masks, so a sample's score equals the
release's only in distribution. pytorch-ood's ``MCD`` instead runs the whole network in
train mode (dropout layers on, and BatchNorm on batch statistics), which needs repeated
forwards at extraction; it is not this score. Unfitted; reads features and the head.
"""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score

CHUNK = 1024       # rows whose T masks are held at a time


def dropout_masks(rows, T, D, p, seed):
    """(n, T, D) float64 masks: 0 with probability p, else 1 / (1 - p); row r's masks come
    from ``np.random.default_rng([seed, r])``."""
    out = np.empty((len(rows), T, D))
    for i, r in enumerate(rows):
        out[i] = np.random.default_rng([int(seed), int(r)]).random((T, D)) >= p
    return out / (1.0 - p)


@register_score("mcdropout", linear_head=True, title="MC-Dropout", family="features",
                reference="Gal & Ghahramani, ICML 2016; OpenOOD dropout_postprocessor.py",
                paper={"MC-Dropout (p=0.5, T=5)": {}}, grid=[{"p": [0.1, 0.25, 0.5], "T": [5, 10, 20]}])
def mcdropout(data, p=0.5, T=5, seed=0):
    """(n,) float64 maximum softmax of the mean head logits over T dropout masks."""
    if not 0 <= p < 1 or T < 1:
        raise ValueError(f"mcdropout needs 0 <= p < 1 and T >= 1, got p={p}, T={T}")
    x, rows = data.features, data.rows
    mean = np.empty((data.n, data.num_classes))
    for a in range(0, data.n, CHUNK):
        masks = dropout_masks(rows[a:a + CHUNK], int(T), x.shape[1], p, seed)
        z = (x[a:a + CHUNK, None, :] * masks) @ data.head_weight.T
        mean[a:a + CHUNK] = z.mean(axis=1) + data.head_bias
    return np.exp(log_softmax(mean)).max(axis=1)
