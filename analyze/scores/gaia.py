"""GAIA-Z and GAIA-A (Chen et al., "GAIA: Delving into Gradient-based Attribution
Abnormality for Out-of-distribution Detection", NeurIPS 2023; code JGEthanChen/GAIA-OOD,
``cal_method.py``: ``cal_zero`` and ``cal_grad_value``).

GAIA-Z (zero-deflation): for every BatchNorm2d output (hook set ``bn``; BiT: the
GroupNorms of ``body.block4``; on models without BatchNorm the GroupNorms or LayerNorms,
where exact zeros are rare: see ``tau``), r_c is the fraction of non-zero entries of the gradient of
the summed max logit in channel c; the score is minus the mean over all channels of all
layers of r_c^2.

GAIA-A (channel-wise average abnormality): a_c the spatial means of the gradient of the
summed head input (``feature_sum``) at the ``before_head`` norm layers, ``out =
sqrt(mean_c |m_c|)`` with m the spatial means of the gradient of the summed log-softmax
at the last ``before_head`` layer; the score is minus mean_c (|a_c| / out)^2.

Sweepable variants (``analyze.aggregate``): ``spatial`` reduction of each channel's map,
``channel`` aggregation, ``layers`` subset, GAIA-Z's ``objective``, and ``tau``: count
|g| > tau instead of g != 0 (needs ``raw`` maps), for caches whose exact zeros rounding
may have moved.
"""
import numpy as np

from gradood.analyze.aggregate import CHANNEL, SPATIAL, aggregate_channels, choose_layers, spatial_stat
from gradood.analyze.registry import register_score
from gradood.store.schema import OBJECTIVES

GAIA = "Chen et al., NeurIPS 2023 (GAIA); JGEthanChen/GAIA-OOD cal_method.py"


def _gaia_a_needs(p):
    # the log-softmax gradient at the last before_head layer, the feature-sum gradient at
    # the others: each backward pass stops at the layers it feeds
    return [("before_head:last", "log_softmax_sum", "mean"), ("before_head:inner", "feature_sum", SPATIAL[p["spatial"]])]


def _gaia_z_needs(p):
    if p["tau"] < 0:
        raise ValueError(f"gaia_z.tau must be >= 0 (a count of |g| > tau), got {p['tau']:g}")
    stat = "map" if p["tau"] and p["spatial"] == "nonzero" else SPATIAL[p["spatial"]]
    return [(p["hooks"], p["objective"], stat)]


# GAIA-Z counts exact zeros, which a gradient gets behind ReLU-like activations (those
# that are exactly flat on part of their input). Behind SiLU, GELU and the like, exact
# zeros are rare and the counts nearly constant. The activation applied to each layer is
# recorded (``layer_activations``); caches without it: the LayerNorm models (ViT, Swin,
# ConvNeXt) use GELU.
_EXACT_ZEROS = ("ReLU", "ReLU6", "Hardtanh", "Hardswish", "Hardsigmoid")
_NO_EXACT_ZEROS = ("LayerNorm", "LayerNorm2d")


def _gaia_z_note(p, attrs):
    layers = attrs["hook_sets"].get(p["hooks"], [])
    after = attrs.get("layer_activations")
    if after is not None:
        kinds = sorted({after.get(l, "") for l in layers} - {"", *_EXACT_ZEROS})
        what = f"followed by {'/'.join(kinds)}"
    else:
        kinds = sorted({(attrs.get("layer_types") or {}).get(l, "") for l in layers} & set(_NO_EXACT_ZEROS))
        what = f"{'/'.join(kinds)} layers, followed by GELU"
    note = f"{p['hooks']} layers, {p['objective']} gradient"
    if kinds and p["spatial"] == "nonzero" and not p["tau"]:
        note += (f"; its layers are {what}, not ReLU, so exact zeros of their gradients are rare (the counts "
                 "may be constant): gaia_z.tau=T counts |g| > T instead (needs raw maps)")
    return note


def _before_head_inner(attrs):
    return attrs["hook_sets"].get("before_head", [])[:-1]


@register_score(
    "gaia_a", title="GAIA-A", reference=GAIA, family="gradient", default=True,
    needs=_gaia_a_needs, choices={"spatial": tuple(SPATIAL), "channel": CHANNEL},
    layer_set=_before_head_inner, paper={"GAIA-A (paper)": {}},
    grid=[{"layers": ["all"], "spatial": ["mean", "l1", "l2", "max", "nonzero"],
           "channel": ["sq_mean", "mean", "l1", "l2", "max"]},
          {"layers": ["each"]}])
def gaia_a(data, layers=None, spatial="mean", channel="sq_mean"):
    """GAIA-A, (n,) float64: minus mean_c (|a_c| / out)^2 with the defaults.

    layers: a subset of the ``before_head`` layers other than the last (default all).
    """
    *inner, last = data.layers("before_head")
    inner = inner if layers is None else [l for l in choose_layers(data, "before_head", layers) if l != last]
    m = data.stat(last, "log_softmax_sum", "mean")
    out = np.sqrt(np.abs(m).mean(axis=1))[:, None]
    a = np.abs(np.concatenate([spatial_stat(data, l, "feature_sum", spatial) for l in inner], axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return -aggregate_channels(a / out, channel)


@register_score(
    "gaia_z", title="GAIA-Z", reference=GAIA, family="gradient", default=True,
    needs=_gaia_z_needs, describe=_gaia_z_note,
    choices={"spatial": tuple(SPATIAL), "channel": CHANNEL, "objective": tuple(OBJECTIVES),
             "hooks": ("bn", "before_head", "before_head_gn")},
    layer_set=lambda attrs: attrs["hook_sets"].get("bn", []), paper={"GAIA-Z (paper)": {}},
    grid=[{"layers": ["all"], "objective": ["max_logit", "log_softmax_sum", "feature_sum"],
           "spatial": ["nonzero", "mean", "l1", "l2", "max"],
           "channel": ["sq_mean", "mean", "l1", "l2", "max"]},
          {"layers": ["each"]}])
def gaia_z(data, layers=None, spatial="nonzero", channel="sq_mean", objective="max_logit", tau=0.0,
           hooks="bn"):
    """GAIA-Z, (n,) float64: minus the mean over all channels of all ``bn`` layers of r_c^2,
    r_c the fraction of non-zero entries of the max-logit gradient (the defaults).

    hooks: the hook set read: ``bn`` (GAIA's CIFAR command), ``before_head`` (its ImageNet
    command on BiT), ``before_head_gn`` (its ImageNet Textures row).
    """
    if tau < 0:
        raise ValueError(f"gaia_z.tau must be >= 0, got {tau}")
    layers = choose_layers(data, hooks, layers)
    r = np.concatenate([spatial_stat(data, l, objective, spatial, tau) for l in layers], axis=1)
    return -aggregate_channels(r, channel)
