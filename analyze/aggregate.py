"""Per-layer aggregations of cached channel statistics, read block by block.

All functions take an open ``store.reader.CacheReader`` and a row range and return
float64 arrays with one row per sample.
"""
import numpy as np

from store.schema import stat_path


def layer_area(reader, layer):
    """H * W of a hooked layer's output."""
    shape = reader.attrs["layer_shapes"][layer]
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def nonzero_fraction(reader, layer, objective, start, stop):
    """(n, C) fraction of the H*W gradient entries of each channel that are non-zero."""
    counts = reader.read(stat_path(layer, objective, "nonzero"), start, stop)
    return counts.astype(np.float64) / layer_area(reader, layer)


def channel_stat(reader, layer, source, stat, start, stop):
    """(n, C) per-channel statistic ``stat`` of ``source`` (``act`` or an objective), float64."""
    return reader.read(stat_path(layer, source, stat), start, stop).astype(np.float64)


def spatial_sum(reader, layer, source, start, stop):
    """(n, C) spatial sum per channel: the stored spatial mean times H*W."""
    return channel_stat(reader, layer, source, "mean", start, stop) * layer_area(reader, layer)
