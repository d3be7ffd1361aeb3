"""NECO, neural-collapse-inspired detection (Ben Ammar et al., ICLR 2024; official code
gitlab.com/drti/neco ``neco()``): the features are standardised with the mean and
standard deviation (ddof 0) of the ID training features, projected by the PCA of the
standardised training features (scikit-learn ``PCA``); score = ||first ``dim``
principal coordinates|| / ||standardised x||, multiplied by the max logit except for
ResNets (the release's rule: ``use_max_logit`` None follows it from the cache's
architecture family). dim = 100 (the release's default; capped at D). OpenOOD v1.5 has no
NECO, nor does pytorch-ood 0.4.

Fit streamed in three passes (mean, variance, Gram matrix of the standardised rows; memory
O(D^2)): the principal axes are the eigenvectors of that covariance, equal to
scikit-learn's SVD-based ``PCA`` up to sign, which the norm ignores (scores agree to 1e-9
relative)."""
import numpy as np

from gradood.analyze.registry import register_score
from gradood.analyze.streaming import block_sum, gram

RESNET_FAMILIES = ("cifar_resnet", "wrn", "bit")


@register_score("neco", default=True, title="NECO", family="features", fit_params=(), fit_memory="2 D^2",
                reference="Ben Ammar et al., ICLR 2024; gitlab.com/drti/neco", paper={"NECO (dim=100)": {}},
                grid=[{"dim": [16, 32, 64, 100, 128, 256]}])
class NECO:
    """Fitted: ``scale_mean_`` (D,), ``scale_std_`` (D,), ``pca_mean_`` (D,), ``components_`` (D, D)."""

    def __init__(self, dim=100, use_max_logit=None):
        self.dim, self.use_max_logit = dim, use_max_logit

    def fit(self, data):
        total, n = block_sum(data, lambda b: b.features)
        self.scale_mean_ = total / n
        square, _ = block_sum(data, lambda b: (b.features - self.scale_mean_) ** 2)
        std = np.sqrt(square / n)
        self.scale_std_ = np.where(std == 0, 1.0, std)       # StandardScaler keeps constant dims

        def standardised(b):
            return (b.features - self.scale_mean_) / self.scale_std_
        total, _ = block_sum(data, standardised)
        self.pca_mean_ = total / n
        scatter, _ = gram(data, lambda b: standardised(b) - self.pca_mean_)
        vals, vecs = np.linalg.eigh(scatter / n)
        # all components (the release's PCA(D)); at most n of them when there are fewer rows
        keep = np.argsort(-vals)[:min(n, len(vals))]
        self.components_ = vecs[:, keep].T
        return self

    def score(self, data):
        """(n,) float64 norm ratio (times the max logit for non-ResNets)."""
        s = (data.features - self.scale_mean_) / self.scale_std_
        dim = min(int(self.dim), self.components_.shape[0])
        proj = (s - self.pca_mean_) @ self.components_[:dim].T
        ratio = np.linalg.norm(proj, axis=1) / np.linalg.norm(s, axis=1)
        use = self.use_max_logit
        if use is None:
            arch = data.attrs.get("family") or ""
            use = not (arch in RESNET_FAMILIES or "resnet" in str(data.attrs.get("arch", "")).lower())
        return ratio * data.logits.max(axis=1) if use else ratio
