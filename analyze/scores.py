"""OOD scores from a cache. Every score is oriented higher = more in-distribution.

Each ``score_<name>(reader, start, stop, **params)`` returns a float64 array (n,) for rows
``[start, stop)``. Definitions follow the authors' code (METHODS.md):
GAIA ``cal_method.py``, GradNorm ``test_ood.py``.
"""
import numpy as np

from store.recipes import missing_for
from store.schema import CacheError

from . import aggregate as A


def _logits(reader, start, stop):
    return reader.read("logits", start, stop).astype(np.float64)


def log_softmax(z, T=1.0):
    """Row-wise log softmax of z / T (float64)."""
    z = z / T
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def score_msp(reader, start, stop):
    """Maximum softmax probability, max_k p_k."""
    return np.exp(log_softmax(_logits(reader, start, stop))).max(axis=1)


def score_maxlogit(reader, start, stop):
    """Maximum logit, max_k z_k."""
    return _logits(reader, start, stop).max(axis=1)


def score_energy(reader, start, stop, temperature=1.0):
    """Negative free energy, T * logsumexp(z / T)."""
    z = _logits(reader, start, stop) / temperature
    m = z.max(axis=1)
    return temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def score_gradnorm(reader, start, stop, temperature=1.0):
    """GradNorm: L1 norm of dL/dW for L = sum_k -log_softmax(z / T)_k.

    dL/dW is the outer product of dL/dz = (K p - 1) / T and the head input x, so its L1
    norm is (1/T) * sum_k |K p_k - 1| * sum_j |x_j| (no backward pass needed).
    """
    z = _logits(reader, start, stop)
    x = reader.read("features", start, stop).astype(np.float64)
    p = np.exp(log_softmax(z, temperature))
    k = z.shape[1]
    return np.abs(k * p - 1).sum(axis=1) * np.abs(x).sum(axis=1) / temperature


def score_gaia_z(reader, start, stop, layers=None):
    """GAIA-Z: minus the mean over all channels of all ``bn`` layers of r_c^2, r_c the
    fraction of non-zero entries of the max-logit gradient in channel c."""
    layers = layers or reader.attrs["hook_sets"]["bn"]
    r = np.concatenate([A.nonzero_fraction(reader, l, "max_logit", start, stop) for l in layers], axis=1)
    return -np.mean(r ** 2, axis=1)


def score_gaia_a(reader, start, stop, layers=None):
    """GAIA-A: minus mean_c (|a_c| / out)^2.

    ``out = sqrt(mean_c |m_c|)``, m the spatial mean of the log-softmax-sum gradient at the
    last ``before_head`` layer; a the spatial means of the feature-sum gradient at the
    other ``before_head`` layers, concatenated in module order.
    """
    layers = layers or reader.attrs["hook_sets"]["before_head"]
    *inner, last = layers
    m = A.channel_stat(reader, last, "log_softmax_sum", "mean", start, stop)
    out = np.sqrt(np.abs(m).mean(axis=1))[:, None]
    a = np.abs(np.concatenate([A.channel_stat(reader, l, "feature_sum", "mean", start, stop)
                               for l in inner], axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.mean((a / out) ** 2, axis=1)


SCORES = {
    "gaia_a": score_gaia_a, "gaia_z": score_gaia_z, "gradnorm": score_gradnorm,
    "msp": score_msp, "maxlogit": score_maxlogit, "energy": score_energy,
}
SCORE_TITLES = {"gaia_a": "GAIA-A", "gaia_z": "GAIA-Z", "gradnorm": "GradNorm", "msp": "MSP",
                "maxlogit": "MaxLogit", "energy": "Energy"}


def check_score(score):
    """Raise ValueError naming the valid scores when ``score`` is unknown."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)} (or all)")


def compute_score(reader, score, **params):
    """Score ``score`` for every sample of the cache, computed block by block: float64 (N,)."""
    check_score(score)
    problems = missing_for(score, reader.attrs["hook_sets"], reader.attrs["plan"])
    if problems:
        raise CacheError(f"{reader.path} lacks what {score} needs: {'; '.join(problems)}. "
                         f"Re-extract with --score {score}")
    fn = SCORES[score]
    parts = [fn(reader, a, b, **params) for a, b in reader.blocks()]
    return np.concatenate(parts) if parts else np.empty(0)
