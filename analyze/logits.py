"""Numerically stable functions of logits (float64 numpy, rows = samples)."""
import numpy as np


def log_softmax(z, T=1.0):
    """Row-wise log softmax of z / T: (n, K) -> (n, K)."""
    z = z / T
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def logsumexp(z):
    """Row-wise log sum exp: (n, K) -> (n,)."""
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def energy(z, T=1.0):
    """Negative free energy T * logsumexp(z / T): (n, K) -> (n,)."""
    return T * logsumexp(z / T)
