"""KL matching (Hendrycks et al., ICML 2022, "Scaling out-of-distribution detection for
real-world settings"): one template per class, the mean softmax of the fitting rows the
classifier predicts as that class; score = -min over classes of KL(p || template). No
official code was found; as the ViM and GEN releases' ``benchmark.py`` the templates come
from the ID training cache (OpenOOD builds them from its ID validation split: ``--fit-on``
names another cache) and the minimum runs over every class's template, as pytorch-ood 0.4
also does. A class no fitting row is predicted as gets a one-hot
template, as OpenOOD does."""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import group_means


@register_score("klm", default=True, fit_memory="K^2", title="KLM", family="logits", reference="Hendrycks et al., ICML 2022 (KL matching)",
                paper={"KLM": {}})
class KLM:
    """Fitted: ``templates_`` (K, K), row k the mean softmax of rows predicted as k."""

    def fit(self, data):
        k = data.num_classes
        means, counts = group_means(data, lambda b: np.exp(log_softmax(b.logits)), lambda b: b.logits.argmax(axis=1), k)
        self.templates_ = np.where((counts > 0)[:, None], means, np.eye(k))
        return self

    def score(self, data):
        """(n,) float64 minus the smallest KL divergence to a class template."""
        lp = log_softmax(data.logits)
        p = np.exp(lp)
        t = self.templates_
        zero = t == 0
        log_t = np.log(np.where(zero, 1.0, t))
        # KL(p || t_c) = sum_j p_j log p_j - sum_j p_j log t_cj, over the j with p_j > 0;
        # infinite where t_c is zero at such a j
        kl = np.where(p > 0, p * lp, 0.0).sum(axis=1)[:, None] - p @ log_t.T
        kl[((p > 0).astype(np.float64) @ zero.T.astype(np.float64)) > 0] = np.inf
        return -kl.min(axis=1)
