"""OpenMax (Bendale & Boult, CVPR 2016), as OpenOOD's ``openmax_postprocessor.py`` runs it:
fitted on the logits of the correctly classified training rows. Per class c, the mean
logit vector MAV_c and a Weibull model of the 20 largest Euclidean distances
||z - MAV_c|| (libMR's ``fit_high``: the tail shifted to d + 1 - min(tail), then a
two-parameter maximum-likelihood Weibull fit; here ``scipy.stats.weibull_min.fit`` with
the location fixed at 0, libMR itself is not run). The two maximum-likelihood solvers
differ: on the demo classifier the fitted parameters differ by up to 2.2e-5 relative,
which moves the scores by up to 2.4e-4. A sample's three
top logits get weights 1, 2/3, 1/3 (alpha rank 3, OpenOOD's hard-coded value), w_c is the
Weibull CDF of its shifted distance to MAV_c (0 below the shift), the logits become
z_c (1 - w_c omega_c) plus an unknown logit u = sum_c z_c w_c omega_c, and the score is
minus the unknown class's softmax probability (OpenOOD's ``conf``). OpenOOD exponentiates
without subtracting the maximum; here the softmax is computed stably (equal wherever
OpenOOD's is finite). Only Euclidean distance is used, as OpenOOD (its ``eucos`` weight is
passed but unused). Fit streamed: class means, then each class's 20 largest distances
merged block by block (memory K^2 + 20 K)."""
import numpy as np
from scipy.stats import weibull_min

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import group_means
from gradood.store.schema import CacheError

TAIL = 20
ALPHA_RANK = 3


@register_score("openmax", default=True, title="OpenMax", family="logits", fit_memory="K^2 + 20 K",
                reference="Bendale & Boult, CVPR 2016; OpenOOD openmax_postprocessor",
                paper={"OpenMax (tail 20, alpha 3)": {}})
class OpenMax:
    """Fitted: ``mav_`` (K, K) mean logits of the correct rows per class; ``shift_`` (K,)
    smallest tail distance; ``shape_``, ``scale_`` (K,) Weibull parameters."""

    def fit(self, data):
        k = data.num_classes

        def right_label(b):      # the label where the classifier is right, else -1
            return np.where(b.logits.argmax(axis=1) == b.labels, b.labels, -1)
        self.mav_, counts = group_means(data, lambda b: b.logits, right_label, k)
        missing = [c for c in range(k) if not counts[c]]
        if missing:
            raise CacheError(f"{data.path}: OpenMax needs a correctly classified training row of every class; "
                             f"none for class(es) {missing[:10]} (a larger training cache helps)")
        tails = [np.empty(0)] * k            # the TAIL largest distances of each class so far
        for block in data.blocks():
            if block.n == 0:
                continue
            y = right_label(block)
            d = np.linalg.norm(block.logits - self.mav_[np.maximum(y, 0)], axis=1)
            for c in np.unique(y[y >= 0]):
                tails[c] = np.sort(np.concatenate([tails[c], d[y == c]]))[-TAIL:]
        self.shift_, self.shape_, self.scale_ = np.zeros(k), np.zeros(k), np.zeros(k)
        for c, tail in enumerate(tails):
            self.shift_[c] = tail.min()
            shape, _, scale = weibull_min.fit(tail + 1 - tail.min(), floc=0)
            self.shape_[c], self.scale_[c] = shape, scale
        return self

    def score(self, data):
        """(n,) float64 minus the OpenMax probability of the unknown class."""
        z = data.logits
        n, k = z.shape
        d = np.linalg.norm(z[:, None, :] - self.mav_[None, :, :], axis=2)        # (n, K)
        shifted = d + 1 - self.shift_
        w = np.where(shifted >= 0, 1 - np.exp(-(np.maximum(shifted, 0) / self.scale_) ** self.shape_), 0.0)
        omega = np.zeros((n, k))
        ranked = np.argsort(z, axis=1)[:, ::-1][:, :ALPHA_RANK]
        for i in range(ranked.shape[1]):
            omega[np.arange(n), ranked[:, i]] = (ALPHA_RANK - i) / ALPHA_RANK
        revised = z * (1 - w * omega)
        unknown = (z * w * omega).sum(axis=1)
        log_p = unknown - logsumexp(np.concatenate([revised, unknown[:, None]], axis=1))
        return -np.exp(log_p)
