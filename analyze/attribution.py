"""Attribution maps from cached raw maps, without the model (numpy only).

A layer stored with ``--store LAYER=raw`` keeps its activation map ``a`` (N, C, H, W)
and, for each recorded backward objective, the gradient map ``g`` of that objective with
respect to it, channels first. From them:

* ``gradcam``: the Grad-CAM-style map ReLU(sum_c mean_hw(g_c) * a_c), (N, H, W): where
  the activation pushes the objective up. With the ``max_logit`` objective, g is the
  gradient of the predicted class's logit, as Grad-CAM takes it.
* ``channel_means``: the channel-wise gradient means mean_hw(g_c), (N, C): the
  attribution statistic GAIA-A aggregates; GAIA's argument is that OOD inputs give
  abnormal (near-zero, "zero-deflated") channel means.
* ``map_layer``: which stored layer and objectives a report draws them from.
"""
import numpy as np

from gradood.store.schema import MAP

# Objectives, in order of preference: the Grad-CAM map (the predicted class's logit first)
# and GAIA-A's channel strip (its first pass, the log-softmax sum, first).
CAM_OBJECTIVES = ("max_logit", "log_softmax_sum", "feature_sum")
STRIP_OBJECTIVES = ("log_softmax_sum", "max_logit", "feature_sum")


def gradcam(act, grad):
    """(N, H, W) float64 ReLU(sum_c mean_hw(grad_c) act_c) of ``act`` and ``grad``, both
    (N, C, H, W) channels first."""
    act, grad = np.asarray(act, np.float64), np.asarray(grad, np.float64)
    if act.shape != grad.shape or act.ndim != 4:
        raise ValueError(f"activation {act.shape} and gradient {grad.shape} must be one (N, C, H, W) shape")
    weights = grad.mean(axis=(2, 3))
    return np.maximum(np.einsum("nc,nchw->nhw", weights, act), 0.0)


def channel_means(grad):
    """(N, C) float64 mean over positions of each channel of ``grad`` (N, C, H, W)."""
    return np.asarray(grad, np.float64).mean(axis=(2, 3))


def map_layer(attrs):
    """``(layer, cam objective, strip objective)`` of the deepest layer whose activation
    map and at least one gradient map the cache stores, or None. ``attrs``: a cache's root
    attributes."""
    plan = attrs.get("plan") or {}
    for layer in reversed(attrs.get("layers") or []):
        sources = plan.get(layer, {})
        if MAP not in sources.get("act", []):
            continue
        held = [o for o in CAM_OBJECTIVES if MAP in sources.get(o, [])]
        if held:
            return layer, held[0], next(o for o in STRIP_OBJECTIVES if o in held)
    return None
