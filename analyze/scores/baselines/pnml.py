"""pNML, single-layer predictive normalised maximum likelihood (Bibas, Feder & Hassner,
NeurIPS 2021; code kobybibas/pnml_ood_detection, ``baseline_lit_utils.py``): with X the
L2-normalised ID training features and P = pinv(X^T X), a sample's normalised feature
f = x / ||x|| gets the head's softmax p = softmax(W f + b) (the head applied to the
normalised feature, bias included), x_P = |f^T P f|, g = x_P / (1 + x_P), and the regret
log(sum_c p_c / (p_c + (1 - p_c) p_c^g)) / log(K), in [0, 1], higher for OOD; the score is
1 - regret (the paper's evaluation), higher = more in-distribution.

Differences from the release, written down: the release runs in float32 with
``pinv(rcond=1e-15)``; here float64 with the same cutoff. With fewer training rows than
feature dimensions, or dead feature channels, X^T X is singular and the release's float32
pseudo-inverse keeps directions that are float32 noise (its cutoff is below float32
resolution): fits whose eigenvalues span more than 1e6 are refused rather than matched. A class whose float64 softmax underflows to 0 adds its
limit 0 to the sum (the release's formula gives 0/0 there). Not in OpenOOD;
pytorch-ood 0.4.0 ships a pNML detector. Fit streamed: the Gram matrix of the normalised rows (memory 2 D^2)."""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import gram
from gradood.store.schema import CacheError


SINGULAR = 1e-6     # eigenvalue ratio below which float32 cannot resolve the direction


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@register_score("pnml", linear_head=True, default=True, title="pNML", family="features", fit_params=(), fit_memory="2 D^2",
                reference="Bibas et al., NeurIPS 2021; kobybibas/pnml_ood_detection", paper={"pNML": {}})
class PNML:
    """Fitted: ``inverse_`` (D, D), pinv of the Gram matrix of the normalised training features."""

    def fit(self, data):
        scatter, rows = gram(data, lambda b: _unit(b.features))
        vals = np.linalg.eigvalsh(scatter)
        if vals[0] < SINGULAR * vals[-1]:
            raise CacheError(f"pnml fitted on {data.path}: X^T X of the {rows} normalised training rows is "
                             f"singular to float32 precision (eigenvalues {vals[0]:.3g} to {vals[-1]:.3g}, "
                             f"{int((vals < SINGULAR * vals[-1]).sum())} of {len(vals)} below {SINGULAR:g} of "
                             "the largest), where the release's float32 pseudo-inverse inverts rounding "
                             "noise; fit on more (and more varied) rows than feature dimensions")
        self.inverse_ = np.linalg.pinv(scatter, rcond=1e-15, hermitian=True)
        return self

    def score(self, data):
        """(n,) float64 1 - regret."""
        f = _unit(data.features)
        p = np.exp(log_softmax(f @ data.head_weight.T + data.head_bias))
        xp = np.abs(((f @ self.inverse_) * f).sum(axis=1))
        g = (xp / (1 + xp))[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p / (p + (1 - p) * p ** g), 0.0)
        return 1.0 - np.log(terms.sum(axis=1)) / np.log(p.shape[1])
