"""Synthetic caches in the schema, written without a model: for the scale bench and for
tests of the streamed fits at sizes no real extraction here can reach.

A "world" fixes K class centres in D dimensions and a linear head built from them (seeded),
so ID training and test caches of one world share the model, as real caches of one
checkpoint do. Rows are ``relu(centre[label] + noise)`` (non-negative, as pooled ReLU
features), logits ``x W^T + b`` in float32; an OOD cache draws its rows around centres
moved towards K new ones (``novel``: 0.5 halfway, "near"; 1 the new ones, "far"). Nothing here is a benchmark of detection quality: the data only has
the shapes, dtypes and class structure of an ImageNet-sized cache.
"""
import numpy as np

from .schema import SCHEMA_VERSION, fingerprint, layout
from .writer import CacheWriter

WRITE_ROWS = 16384


def world(num_classes, dim, seed=0):
    """``(centres (K, D), weight (K, D), bias (K,))`` float32 of a synthetic model."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((num_classes, dim), dtype=np.float32))
    weight = (centres - centres.mean(axis=0)) / np.sqrt(dim)
    bias = -(weight * centres.mean(axis=0)).sum(axis=1)
    return centres, weight.astype(np.float32), bias.astype(np.float32)


def write_synthetic(path, n, num_classes=1000, dim=2048, seed=0, world_seed=0, novel=0.0,
                    noise=1.0, split="test", dataset=None):
    """Write an ``n``-row cache at ``path`` drawn from the world of ``world_seed``; returns
    the path. Row i gets label ``i % num_classes`` (-1 for an OOD cache, ``novel`` > 0) and
    features ``relu((1 - novel) centre + novel new_centre + noise * N(0, 1))``, the new
    centres drawn with ``seed``. Written in blocks of ``WRITE_ROWS`` rows: memory
    stays bounded at any ``n``."""
    centres, weight, bias = world(num_classes, dim, world_seed)
    name = dataset or path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    attrs = {"schema_version": SCHEMA_VERSION, "n_samples": int(n), "dataset": name, "split": split,
             "arch": "synthetic", "num_classes": int(num_classes), "feature_dim": int(dim),
             "checkpoint_sha256": f"synthetic-world-{world_seed}", "weights_sha256": f"synthetic-world-{world_seed}",
             "preprocess": {"name": "synthetic"}, "objectives": [], "layers": [], "layer_shapes": {},
             "hook_sets": {}, "plan": {}, "family": "synthetic", "batch_size": WRITE_ROWS}
    attrs["fingerprint"] = fingerprint(attrs)
    rows = layout(num_classes, dim, {}, {})
    writer = CacheWriter(path, attrs, rows, {"head/weight": weight, "head/bias": bias}, int(n))
    rng = np.random.default_rng(seed)
    if novel:
        new = np.abs(rng.standard_normal(centres.shape, dtype=np.float32))
        centres = ((1 - novel) * centres + novel * new).astype(np.float32)

    def blocks():
        for a in range(0, n, WRITE_ROWS):
            b = min(a + WRITE_ROWS, n)
            idx = np.arange(a, b)
            y = idx % num_classes
            x = centres[y] + np.float32(noise) * rng.standard_normal((b - a, dim), dtype=np.float32)
            x = np.maximum(x, 0, dtype=np.float32)
            yield a, b, {"features": x, "logits": (x @ weight.T + bias).astype(np.float32),
                         "labels": (y if novel == 0 else np.full(b - a, -1)).astype(np.int64),
                         "paths": np.array([f"{name}:{i}" for i in idx], dtype=object),
                         "content_hash": np.array([f"{seed:04x}{i:012x}" for i in idx], dtype=object),
                         "skipped": np.zeros(b - a, bool),
                         "skip_reasons": np.full(b - a, "", dtype=object)}
    return writer.write_direct(blocks())
