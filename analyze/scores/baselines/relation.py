"""Relation, neural relation graph (Kim et al., NeurIPS 2023; code
snu-mllab/Neural-Relation-Graph ``relation.py``, ``detect_ood.py``): the similarity of a
sample to every ID training sample, r_j = max(x^ . x^_j, 0) * (p . p_j) with x^ the
L2-normalised features and p the softmax; score = sum over j with r_j > 0.03 of r_j^pow
(pow = 1, the release's advice for OOD and OpenOOD's default). The bank is the whole
training cache; the kernel is computed in chunks."""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score

CHUNK = 1024


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@register_score("relation", default=True, title="Relation", family="features", fit_params=(), fit_memory="n (D + K)",
                reference="Kim et al., NeurIPS 2023; snu-mllab/Neural-Relation-Graph",
                paper={"Relation (pow=1)": {}}, grid=[{"pow": [1, 2, 4, 6, 8]}])
class Relation:
    """Fitted: ``bank_`` (n, D) normalised training features, ``bank_probs_`` (n, K)."""

    def __init__(self, pow=1.0, threshold=0.03):
        self.pow, self.threshold = pow, threshold

    def fit(self, data):
        self.bank_ = _unit(data.features)
        self.bank_probs_ = np.exp(log_softmax(data.logits))
        return self

    def score(self, data):
        """(n,) float64 summed relation to the training samples."""
        x, p = _unit(data.features), np.exp(log_softmax(data.logits))
        out = np.zeros(len(x))
        for a in range(0, len(self.bank_), CHUNK):
            r = np.maximum(x @ self.bank_[a:a + CHUNK].T, 0.0) * (p @ self.bank_probs_[a:a + CHUNK].T)
            out += np.where(r > self.threshold, r ** self.pow, 0.0).sum(axis=1)
        return out
