"""Gradient detectors with a closed form in the cached logits and features (the head's
weight gradient of a loss of the logits is an outer product g x^T):

* GradNorm, KL form (``gradnorm_kl``; Huang et al., NeurIPS 2021, their eq.: the KL
  divergence to the uniform distribution, (1/K) sum_k -log softmax(z / T)_k): L1 norm
  (1/T) sum_k |p_k - 1/K| * sum_j |x_j|, the release's ``gradnorm`` divided by K (same
  ranking). pytorch-ood's ``GradNormKL`` back-propagates a binary cross-entropy against
  1/K targets through all parameters, another quantity; the paper's definition is followed.
* GradUncertainty (``grad_uncertainty``; Lee & AlRegib, ICIP 2020, "Gradients as a
  measure of uncertainty in neural networks"): squared L2 norm of the gradient of the
  binary cross-entropy of the softmax against an all-ones "confounding" label, L =
  -sum_k log p_k, whose logit gradient is K p - 1; for the head (weight and bias):
  ||K p - 1||^2 (||x||^2 + 1). A confident prediction gives a large gradient, so the
  score is the norm itself (higher = more in-distribution, as pytorch-ood's current
  version). No official code exists; torch's BCE clips log p at -100 in the loss and its
  backward divides by max(p (1 - p), 1e-12), so torch's gradient departs from K p - 1
  wherever p (1 - p) < 1e-12 (a probability within 1e-12 of 0 or 1), not only where a
  float32 probability underflows; this score uses the exact K p - 1.
* GradOrth (``gradorth``; Behpour et al., NeurIPS 2023): the norm of the head's gradient
  of the KL-to-uniform loss projected on the principal subspace of the ID training
  features; the gradient is (p - 1/K) x^T, so the projected norm is ||p - 1/K|| * ||B^T x||
  with B the right singular vectors of the (uncentred) training features that keep a
  ``threshold`` = 0.97 fraction of their energy. No official code was found: this follows
  the paper's description, with the threshold of a public re-implementation. The
  singular vectors and values come from the eigendecomposition of the streamed Gram
  matrix X^T X (memory O(D^2)); they equal the SVD's up to sign, which the norm ignores
  (scores agree to 1e-9 relative).
"""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import gram


@register_score("gradnorm_kl", linear_head=True, default=True, title="GradNorm (KL)", family="gradient",
                reference="Huang et al., NeurIPS 2021 (KL form)", paper={"GradNorm KL": {}})
def gradnorm_kl(data, temperature=1.0):
    """(n,) float64 (1/T) sum_k |p_k - 1/K| * ||x||_1."""
    if temperature <= 0:
        raise ValueError(f"gradnorm_kl.temperature must be > 0, got {temperature}")
    z = data.logits
    p = np.exp(log_softmax(z, temperature))
    return np.abs(p - 1.0 / z.shape[1]).sum(axis=1) * np.abs(data.features).sum(axis=1) / temperature


@register_score("grad_uncertainty", linear_head=True, default=True, title="GradUncertainty", family="gradient",
                reference="Lee & AlRegib, ICIP 2020", paper={"GradUncertainty (head)": {}})
def grad_uncertainty(data, bias=True):
    """(n,) float64 squared norm of the head's gradient of -sum_k log p_k."""
    z = data.logits
    g = z.shape[1] * np.exp(log_softmax(z)) - 1.0
    return (g ** 2).sum(axis=1) * ((data.features ** 2).sum(axis=1) + (1.0 if bias else 0.0))


@register_score("gradorth", linear_head=True, default=True, title="GradOrth", family="gradient", fit_params=("threshold",),
                fit_memory="2 D^2",
                reference="Behpour et al., NeurIPS 2023 (paper description)", paper={"GradOrth (0.97)": {}},
                grid=[{"threshold": [0.9, 0.95, 0.97, 0.99]}])
class GradOrth:
    """Fitted: ``basis_`` (D, r), the kept right singular vectors of the training features."""

    def __init__(self, threshold=0.97):
        self.threshold = threshold

    def fit(self, data):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"gradorth.threshold must be in (0, 1], got {self.threshold}")
        scatter, _ = gram(data, lambda b: b.features)
        vals, vecs = np.linalg.eigh(scatter)
        order = np.argsort(-vals)
        s2 = np.maximum(vals[order], 0.0)            # squared singular values, decreasing
        energy = np.cumsum(s2) / s2.sum()
        r = int(np.searchsorted(energy, self.threshold) + 1)
        self.basis_ = vecs[:, order[:r]]
        return self

    def score(self, data):
        """(n,) float64 ||p - 1/K|| * ||B^T x||."""
        z = data.logits
        g = np.exp(log_softmax(z)) - 1.0 / z.shape[1]
        return np.linalg.norm(g, axis=1) * np.linalg.norm(data.features @ self.basis_, axis=1)
