"""ViM, virtual-logit matching (Wang et al., CVPR 2022; haoqiwang/vim): origin u =
-pinv(W) b; principal subspace of dimension ``dim`` of the ID training features centred
at u (default: 1000 if D >= 1500, 512 if D >= 768, else D/2, as the paper chooses);
score = energy(z) - alpha * ||(x - u) P_perp||, alpha = mean max-logit / mean residual
norm on the training set. pytorch-ood runs the eigendecomposition in float32; here it is
float64.
"""
import numpy as np

from analyze.logits import energy
from analyze.registry import register_score
from store.schema import CacheError


def vim_default_dim(feature_dim):
    """Principal-subspace dimension the ViM paper uses for a feature dimension."""
    if feature_dim >= 1500:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


@register_score("vim", title="ViM", family="features", default=True,
                reference="Wang et al., CVPR 2022", paper={"ViM (paper dim)": {}},
                grid=[{"dim": [16, 64, 128, 256]}])
class ViM:
    """Fitted: ``u_`` (D,), ``residual_`` (D, D - dim), ``alpha_`` ()."""

    def __init__(self, dim=None):
        self.dim = dim

    def fit(self, data):
        w, b = data.head_weight, data.head_bias
        x = data.features
        dim = vim_default_dim(x.shape[1]) if self.dim is None else int(self.dim)
        if not 0 < dim < x.shape[1]:
            raise ValueError(f"vim.dim must be between 1 and {x.shape[1] - 1}, got {dim}")
        if len(x) <= x.shape[1]:
            # the training rows then span at most n dimensions: their residuals outside the
            # principal subspace vanish and alpha (mean max logit / mean residual) explodes
            raise CacheError(f"{self.__class__.__name__.lower()} fitted on {data.path}: {len(x)} rows of "
                             f"{x.shape[1]}-d features; the principal subspace needs more rows than "
                             f"feature dimensions (at least {x.shape[1] + 1}; extract more with "
                             "--split train --limit N)")
        self.u_ = -np.linalg.pinv(w) @ b
        centred = x - self.u_
        cov = centred.T @ centred / len(x)
        vals, vecs = np.linalg.eigh(cov)
        self.residual_ = vecs[:, np.argsort(-vals)[dim:]]
        vlogit = np.linalg.norm(centred @ self.residual_, axis=1)
        self.alpha_ = np.array((x @ w.T + b).max(axis=1).mean() / vlogit.mean())
        return self

    def score(self, data):
        """(n,) float64 energy minus alpha times the residual norm."""
        x = data.features
        vlogit = np.linalg.norm((x - self.u_) @ self.residual_, axis=1) * float(self.alpha_)
        return energy(x @ data.head_weight.T + data.head_bias) - vlogit


@register_score("residual", title="Residual", family="features", default=True,
                reference="Wang et al., CVPR 2022 (the ViM release's Residual baseline)",
                paper={"Residual (paper dim)": {}}, grid=[{"dim": [16, 64, 128, 256]}])
class Residual(ViM):
    """Minus the norm of the feature's residual outside ViM's principal subspace (no
    energy), the ViM release's ``Residual`` baseline; fitted as ViM."""

    def score(self, data):
        """(n,) float64 -||(x - u) P_perp||."""
        return -np.linalg.norm((data.features - self.u_) @ self.residual_, axis=1)
