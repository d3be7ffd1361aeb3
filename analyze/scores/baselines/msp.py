"""MSP, maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): max_k softmax(z)_k."""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score


@register_score("msp", title="MSP", family="logits", default=True, paper={"MSP": {}},
                reference="Hendrycks & Gimpel, ICLR 2017")
def msp(data):
    """(n,) float64 maximum softmax probability."""
    return np.exp(log_softmax(data.logits)).max(axis=1)
