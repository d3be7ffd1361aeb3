"""ViM, virtual-logit matching (Wang et al., CVPR 2022; haoqiwang/vim): origin u =
-pinv(W) b; principal subspace of dimension ``dim`` of the ID training features centred
at u (default: 1000 if D >= 1500, 512 if D >= 768, else D/2, as the paper chooses);
score = energy(z) - alpha * ||(x - u) P_perp||, alpha = mean max-logit / mean residual
norm on the training set. pytorch-ood runs the eigendecomposition in float32; here it is
float64. Fit streamed in two passes over the blocks of the training cache (the Gram
matrix of the centred rows, then the mean max-logit and residual norm): peak memory
O(D^2) float64 beside one block.
"""
import numpy as np

from gradood.analyze.logits import energy
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import block_sum, gram
from gradood.store.schema import CacheError


def vim_default_dim(feature_dim):
    """Principal-subspace dimension the ViM paper uses for a feature dimension."""
    if feature_dim >= 1500:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


@register_score("vim", linear_head=True, title="ViM", family="features", default=True, fit_memory="2 D^2",
                reference="Wang et al., CVPR 2022", paper={"ViM (paper dim)": {}},
                grid=[{"dim": [16, 64, 128, 256]}])
class ViM:
    """Fitted: ``u_`` (D,), ``residual_`` (D, D - dim), ``alpha_`` ()."""

    def __init__(self, dim=None):
        self.dim = dim

    def fit(self, data):
        w, b = data.head_weight, data.head_bias
        n, d = data.n, w.shape[1]
        dim = vim_default_dim(d) if self.dim is None else int(self.dim)
        if not 0 < dim < d:
            raise ValueError(f"vim.dim must be between 1 and {d - 1}, got {dim}")
        if n <= d:
            # the training rows then span at most n dimensions: their residuals outside the
            # principal subspace vanish and alpha (mean max logit / mean residual) explodes
            raise CacheError(f"{self.__class__.__name__.lower()} fitted on {data.path}: {n} rows of "
                             f"{d}-d features; the principal subspace needs more rows than "
                             f"feature dimensions (at least {d + 1}; extract more with "
                             "--split train --limit N)")
        self.u_ = -np.linalg.pinv(w) @ b
        scatter, rows = gram(data, lambda block: block.features - self.u_)
        vals, vecs = np.linalg.eigh(scatter / rows)
        self.residual_ = vecs[:, np.argsort(-vals)[dim:]]
        max_logit, _ = block_sum(data, lambda block: (block.features @ w.T + b).max(axis=1))
        vlogit, _ = block_sum(data, lambda block: np.linalg.norm((block.features - self.u_) @ self.residual_, axis=1))
        self.alpha_ = np.array((max_logit / rows) / (vlogit / rows))
        return self

    def score(self, data):
        """(n,) float64 energy minus alpha times the residual norm."""
        x = data.features
        vlogit = np.linalg.norm((x - self.u_) @ self.residual_, axis=1) * float(self.alpha_)
        return energy(x @ data.head_weight.T + data.head_bias) - vlogit


@register_score("residual", linear_head=True, title="Residual", family="features", default=True,
                reference="Wang et al., CVPR 2022 (the ViM release's Residual baseline)",
                paper={"Residual (paper dim)": {}}, fit_memory="2 D^2", grid=[{"dim": [16, 64, 128, 256]}])
class Residual(ViM):
    """Minus the norm of the feature's residual outside ViM's principal subspace (no
    energy), the ViM release's ``Residual`` baseline; fitted as ViM."""

    def score(self, data):
        """(n,) float64 -||(x - u) P_perp||."""
        return -np.linalg.norm((data.features - self.u_) @ self.residual_, axis=1)
