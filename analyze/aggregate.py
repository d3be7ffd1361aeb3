"""Reductions of per-channel gradient statistics, shared by the GAIA-family scores.

``spatial``: how each channel's H x W gradient map is reduced, from the cached statistics
(``SPATIAL`` maps each reduction to the statistic it reads):
    nonzero  fraction of non-zero entries      mean  spatial mean     sum  spatial sum
    max      max |v|                          l1    sum |v|          l2   sqrt(sum v^2)
``channel``: how the concatenated (n, C) per-channel values become one score per row:
    sq_mean (mean of squares, GAIA), mean, l1, l2, max (of |r|).
"""
import numpy as np

SPATIAL = {"nonzero": "nonzero", "mean": "mean", "sum": "mean", "max": "abs_max",
           "l1": "abs_mean", "l2": "sq_mean"}
CHANNEL = ("sq_mean", "mean", "l1", "l2", "max")


def spatial_stat(data, layer, source, spatial, tau=0.0):
    """(n, C) float64 per-channel reduction ``spatial`` of ``source`` at ``layer``.

    data: an ``analyze.data.CacheData``. tau: with ``nonzero``, count |v| > tau instead of
    v != 0 (needs the stored maps when tau > 0).
    """
    if spatial == "nonzero":
        counts = data.count_above(layer, source, tau) if tau else data.stat(layer, source, "nonzero")
        return counts / data.area(layer)
    v = data.stat(layer, source, SPATIAL[spatial])
    area = data.area(layer)
    if spatial in ("sum", "l1"):
        return v * area
    if spatial == "l2":
        return np.sqrt(v * area)
    return v


def aggregate_channels(r, channel):
    """Aggregate (n, C) per-channel values into (n,) by ``channel``."""
    if channel == "sq_mean":
        return np.mean(r ** 2, axis=1)
    if channel == "mean":
        return np.mean(r, axis=1)
    if channel == "l1":
        return np.abs(r).sum(axis=1)
    if channel == "l2":
        return np.sqrt((r ** 2).sum(axis=1))
    if channel == "max":
        return np.abs(r).max(axis=1)
    raise ValueError(f"unknown channel aggregation {channel!r}; choose one of: {', '.join(CHANNEL)}")


def choose_layers(data, hook_set, layers):
    """Layers of ``hook_set``, or the subset ``layers`` (a name or a list) of them, validated."""
    known = data.layers(hook_set)
    if layers is None:
        return known
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [l for l in layers if l not in known]
    if unknown:
        raise ValueError(f"layers {unknown} are not in hook set {hook_set!r} of {data.path}: {known}")
    return layers
