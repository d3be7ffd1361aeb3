"""GEN, generalized entropy (Liu et al., CVPR 2023; code XixiLiu95/GEN ``benchmark.py``
``generalized_entropy``): S = -sum over the M largest probabilities of p^gamma (1 - p)^gamma,
gamma = 0.1 and M = 100 (the release's and OpenOOD's defaults; M > K keeps all K). No
epsilon, a sum (pytorch-ood takes the mean and clips p at 1e-7: same ranking except where
p underflows). Sweep: OpenOOD's gamma and M lists."""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score


@register_score("gen", default=True, title="GEN", family="logits", reference="Liu et al., CVPR 2023; XixiLiu95/GEN",
                paper={"GEN (gamma=0.1, M=100)": {}},
                grid=[{"gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10], "M": [10, 50, 100, 200, 500, 1000]}])
def gen(data, gamma=0.1, M=100):
    """(n,) float64 minus the generalized entropy of the top-M probabilities."""
    if gamma <= 0 or M < 1:
        raise ValueError(f"gen needs gamma > 0 and M >= 1, got gamma={gamma}, M={M}")
    p = np.sort(np.exp(log_softmax(data.logits)), axis=1)[:, -M:]
    return -(p ** gamma * (1.0 - p) ** gamma).sum(axis=1)
