"""GradNorm (Huang et al., "On the Importance of Gradients for Detecting Distributional
Shifts in the Wild", NeurIPS 2021; code deeplearning-wisc/gradnorm_ood, ``test_ood.py``
``iterate_data_gradnorm``).

The release back-propagates, at batch size 1, L = sum_k -log_softmax(z / T)_k (the KL
divergence to the uniform distribution up to constants) and takes the L1 norm of the
gradient of the head weight. dL/dW is the outer product of dL/dz = (K p - 1) / T and the
head input x, so the norm is (1/T) * sum_k |K p_k - 1| * sum_j |x_j|: no backward pass is
needed (a test checks it against batch-size-1 autograd). pytorch-ood's ``GradNorm`` by
default takes the gradient norm over all the model's parameters, not the head's weight
only, another quantity; only its head-weight variant matches this, and divides L by K
(its KL form): the same ranking, values 1/K of these.
"""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score


@register_score("gradnorm", linear_head=True, title="GradNorm", family="gradient", default=True,
                reference="Huang et al., NeurIPS 2021; deeplearning-wisc/gradnorm_ood test_ood.py",
                paper={"GradNorm (paper)": {}})
def gradnorm(data, temperature=1.0):
    """(n,) float64 L1 norm of the head-weight gradient of sum_k -log_softmax(z / T)_k."""
    if temperature <= 0:
        raise ValueError(f"gradnorm.temperature must be > 0, got {temperature}")
    z = data.logits
    x = data.features
    p = np.exp(log_softmax(z, temperature))
    k = z.shape[1]
    return np.abs(k * p - 1).sum(axis=1) * np.abs(x).sum(axis=1) / temperature
