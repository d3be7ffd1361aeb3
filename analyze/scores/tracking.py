"""Gradient tracking (repository gengandrew/Open_OOD) from cached per-sample norms.

The cache holds ``tracking/norms`` (N, K, P): for sample n, cross-entropy label k and
tracked weight tensor p (norm layers and biases excluded; names in the root attribute
``tracked_parameters``), the L2 norm of the weight gradient, recorded by the extraction
pass ``tracking`` (K backward passes per batch, exact per-sample norms). Lower norms mean
more in-distribution, so scores are negated.

reduce: per tensor, the smallest (``min``, Open_OOD's ``score=min``), largest or mean norm
over the K labels. tensor: an index into ``tracked_parameters`` (or a name) to score that
tensor alone (their ``norm_single``); left out, the tensors are combined as the L2 norm of
all of them together, sqrt(sum_p n_p^2).
"""
import numpy as np

from gradood.analyze.registry import register_score

REDUCTIONS = ("min", "max", "mean")


@register_score("tracking", title="GradTrack", family="gradient", passes=("tracking",),
                reference="gengandrew/Open_OOD (gradient tracking)", choices={"reduce": REDUCTIONS},
                grid=[{"reduce": list(REDUCTIONS)}])
def tracking(data, reduce="min", tensor=None):
    """(n,) float64 minus the label-reduced weight-gradient norm (all tensors, or one)."""
    n = getattr(data.tracking_norms, reduce)(axis=1)
    if tensor is None:
        return -np.sqrt((n ** 2).sum(axis=1))
    if isinstance(tensor, str):
        names = data.tracked_parameters
        if tensor not in names:
            raise ValueError(f"{tensor!r} is not a tracked parameter; tracked: {', '.join(names[:8])}, ...")
        tensor = names.index(tensor)
    return -n[:, int(tensor)]
