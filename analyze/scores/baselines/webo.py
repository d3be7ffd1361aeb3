"""Weighted energy (VOS, Du et al., ICLR 2022; deeplearning-wisc/vos) as pytorch-ood's
``WeightedEBO`` computes it: log sum_k relu(w_k) exp(z_k), with w (K,) the class weights
VOS learns beside the classifier (its ``weight_energy``, a ``Linear(K, 1)``). pytorch-ood
returns the negative as an outlier score; this is the confidence. The weights are not part
of a classifier's checkpoint: ``weights`` names a ``.npy`` file of K numbers (e.g.
``np.save(path, ckpt["weight_energy.weight"].numpy().ravel())``). With every weight 1 the
score is the energy. Unfitted; reads logits.
"""
import numpy as np

from gradood.analyze.registry import register_score
from gradood.store.schema import CacheError


def load_weights(path, k):
    """(K,) float64 weights from the ``.npy`` file ``path``; raises CacheError naming the problem."""
    if not path:
        raise CacheError("webo needs the VOS class weights: --param webo.weights=FILE.npy (K numbers; "
                         "VOS saves them as weight_energy.weight)")
    try:
        w = np.load(path, allow_pickle=False).astype(np.float64).ravel()
    except (OSError, ValueError) as err:
        raise CacheError(f"webo.weights={path}: cannot read it as a .npy array ({err})") from None
    if w.shape != (k,):
        raise CacheError(f"webo.weights={path}: {w.size} weights for a {k}-class cache")
    return w


def _defined_on(params, attrs):
    return "" if params["weights"] else "it needs the VOS class weights (--param webo.weights=FILE.npy)"


@register_score("webo", title="WeightedEBO", family="logits", defined_on=_defined_on,
                reference="Du et al., ICLR 2022 (VOS); pytorch-ood WeightedEBO")
def webo(data, weights=""):
    """(n,) float64 log sum_k relu(w_k) exp(z_k)."""
    w = np.maximum(load_weights(weights, data.num_classes), 0)
    z = data.logits
    m = z.max(axis=1)
    with np.errstate(divide="ignore"):
        return m + np.log((w * np.exp(z - m[:, None])).sum(axis=1))
