"""Temperature scaling (Guo et al., ICML 2017), OpenOOD's ``temp_scaling`` and pytorch-ood's
``TempScaling``: the maximum softmax probability at the temperature T that minimises the
negative log-likelihood of the labelled fitting rows (the ID training cache; OpenOOD uses
its ID validation split: ``--fit-on``). T is found to 1e-6 relative by a bounded scalar
minimisation over log T. OpenOOD's 50 LBFGS steps from T = 1.5 need not reach that
minimum: run side by side on one model, OpenOOD stopped at T = 1.16 (NLL 0.039) where this
finds T = 0.49 (NLL 0.012), so the two tools' TempScale scores differ."""
import numpy as np
from scipy.optimize import minimize_scalar

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score
from gradood.store.schema import CacheError


@register_score("tempscale", title="TempScale", family="logits", default=True, fit_memory="n K",
                reference="Guo et al., ICML 2017 (temperature scaling)", paper={"TempScale": {}})
class TempScale:
    """Fitted: ``temperature_`` (), the NLL-minimising temperature."""

    def fit(self, data):
        z, y = data.logits, data.labels
        if (y < 0).any():
            raise CacheError(f"{data.path}: temperature scaling needs labelled fitting rows")

        def nll(log_t):
            return -log_softmax(z, np.exp(log_t))[np.arange(len(z)), y].mean()
        res = minimize_scalar(nll, bounds=(np.log(1e-3), np.log(1e3)), method="bounded",
                              options={"xatol": 1e-6})
        self.temperature_ = np.array(np.exp(res.x))
        return self

    def score(self, data):
        """(n,) float64 max softmax at the fitted temperature."""
        return np.exp(log_softmax(data.logits, float(self.temperature_))).max(axis=1)
