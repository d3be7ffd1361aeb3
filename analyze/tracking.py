"""Gradient tracking (repository gengandrew/Open_OOD) from cached per-sample norms.

The cache holds ``tracking/norms`` (N, K, P): for sample n, cross-entropy label k and
tracked weight tensor p (norm layers and biases excluded; names in the root attribute
``tracked_parameters``), the L2 norm of the weight gradient. Lower norms mean more
in-distribution, so scores are negated.
"""
import numpy as np

from store.schema import TRACKING_PATH

REDUCTIONS = ("min", "max", "mean")


def label_reduced_norms(reader, start, stop, reduce="min"):
    """(n, P) norms reduced over the K labels by ``min``/``max``/``mean`` (float64)."""
    norms = reader.read(TRACKING_PATH, start, stop).astype(np.float64)
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown tracking reduction {reduce!r}; choose one of: {', '.join(REDUCTIONS)}")
    return getattr(norms, reduce)(axis=1)


def score_tracking(reader, start, stop, reduce="min", tensor=None):
    """Gradient-tracking score, float64 (n,).

    reduce: per tensor, the smallest (``min``, Open_OOD's ``score=min``), largest or mean
    norm over the K labels. tensor: an index into ``tracked_parameters`` (or a name) to
    score that tensor alone (their ``norm_single``); left out, the tensors are combined
    as the L2 norm of all of them together, sqrt(sum_p n_p^2). Returns minus the norm.
    """
    n = label_reduced_norms(reader, start, stop, reduce)
    if tensor is None:
        return -np.sqrt((n ** 2).sum(axis=1))
    if isinstance(tensor, str):
        names = reader.attrs["tracked_parameters"]
        if tensor not in names:
            raise ValueError(f"{tensor!r} is not a tracked parameter; tracked: {', '.join(names[:8])}, ...")
        tensor = names.index(tensor)
    return -n[:, int(tensor)]
