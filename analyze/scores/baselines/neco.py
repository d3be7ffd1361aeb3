"""NECO, neural-collapse-inspired detection (Ben Ammar et al., ICLR 2024; official code
gitlab.com/drti/neco ``neco()``): the features are standardised with the mean and
standard deviation (ddof 0) of the ID training features, projected by the PCA of the
standardised training features (scikit-learn ``PCA``); score = ||first ``dim``
principal coordinates|| / ||standardised x||, multiplied by the max logit except for
ResNets (the release's rule: ``use_max_logit`` None follows it from the cache's
architecture family). dim = 100 (the release's default; capped at D). OpenOOD v1.5 has no
NECO; pytorch-ood multiplies by the max logit unless told otherwise."""
import numpy as np
from sklearn.decomposition import PCA

from analyze.registry import register_score

RESNET_FAMILIES = ("cifar_resnet", "wrn", "bit")


@register_score("neco", default=True, title="NECO", family="features", fit_params=(),
                reference="Ben Ammar et al., ICLR 2024; gitlab.com/drti/neco", paper={"NECO (dim=100)": {}},
                grid=[{"dim": [16, 32, 64, 100, 128, 256]}])
class NECO:
    """Fitted: ``scale_mean_`` (D,), ``scale_std_`` (D,), ``pca_mean_`` (D,), ``components_`` (D, D)."""

    def __init__(self, dim=100, use_max_logit=None):
        self.dim, self.use_max_logit = dim, use_max_logit

    def fit(self, data):
        x = data.features
        self.scale_mean_ = x.mean(axis=0)
        std = x.std(axis=0)
        self.scale_std_ = np.where(std == 0, 1.0, std)       # StandardScaler keeps constant dims
        # all components (the release's PCA(D)); at most n of them when there are fewer rows
        pca = PCA(n_components=min(x.shape)).fit((x - self.scale_mean_) / self.scale_std_)
        self.pca_mean_, self.components_ = pca.mean_, pca.components_
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
