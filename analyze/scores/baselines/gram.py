"""GRAM, Gram-matrix deviations (Sastry & Oore, ICML 2020; VectorInstitute/gram-ood-detection)
as OpenOOD runs it (``gram_postprocessor.py``, ``configs/postprocessors/gram.yml``).

Reads, per layer of the ``gram`` hook set (every Conv2d and ReLU module, OpenOOD's rule),
the statistics ``gram1`` .. ``gram{max_power}`` that extraction records for it
(``store.schema``: per channel, the p-th order Gram row sum sign(s) |s|^(1/p)); the
extraction cost is one pass over each hooked map per power, and the cache holds C values
per layer and power, not the maps.

Fit, on the ID training cache (its labels): in each class, in order of the class's first
appearance, ``int(0.1 L)`` of its L rows are drawn with ``random.Random(seed).sample`` as
the release draws them (its ``random`` module, unseeded); per layer, power and class, the
channel-wise minimum and maximum over the class's other rows; per layer, the normaliser,
the mean over the drawn rows of the summed deviations from their own class's bounds.
The deviation of a vector x from bounds (lo, hi) is
sum_c relu(lo - x) / |lo + 1e-6| + relu(x - hi) / |hi + 1e-6|.

Score: with c the predicted class and p its softmax probability,
-(sum over layers, powers of deviation from class c's bounds / the layer's normaliser) / p.
Fit memory: 2 P K C per layer (bounds), streamed in two passes over the training cache.

Precision: the release sums its Gram matrices in float32, and where a conv output is
signed those sums cancel; the statistics here are summed in float64. On the demo
classifier (``bench/peers.py``) the release's per-sample scores differ from these by up to
2 % of the score range (median 3e-6 relative); run with its G_p in float64, it agrees to
6e-7.
"""
import random

import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score
from gradood.analyze.streaming import gather
from gradood.store.schema import GRAM_POWERS, CacheError

HOOK_SET = "gram"


def deviation(lo, hi, x):
    """(n,) float64 summed normalised excess of x (n, C) below lo / above hi (n, C) or (C,)."""
    return (np.maximum(lo - x, 0) / np.abs(lo + 1e-6)).sum(1) + (np.maximum(x - hi, 0) / np.abs(hi + 1e-6)).sum(1)


def held_out(labels, seed):
    """(n,) bool: the rows the release sets aside, per class ``int(0.1 L)`` of its L rows
    (indices within the class, in row order) from one ``random.Random(seed)`` drawing class
    after class in order of first appearance."""
    rng, out = random.Random(seed), np.zeros(len(labels), bool)
    _, first = np.unique(labels, return_index=True)
    for c in labels[np.sort(first)]:
        rows = np.flatnonzero(labels == c)
        out[rows[rng.sample(range(len(rows)), int(0.1 * len(rows)))]] = True
    return out


def _needs(params):
    return [(HOOK_SET, "act", f"gram{p}") for p in range(1, int(params["max_power"]) + 1)]


@register_score("gram", title="GRAM", family="features", needs=_needs, fit_memory="2 P K C per layer",
                fit_params=("max_power", "seed"),
                reference="Sastry & Oore, ICML 2020; OpenOOD gram_postprocessor.py",
                paper={"GRAM (p=1..5, OpenOOD)": {}, "GRAM (p=1..10, paper)": {"max_power": 10}},
                grid=[{"max_power": [1, 2, 3, 5, 10]}])
class GRAM:
    """Fitted: ``lo_`` and ``hi_`` {layer: (P, K, C)} class bounds, ``norm_`` {layer: ()}."""

    def __init__(self, max_power=5, seed=0):
        self.max_power, self.seed = max_power, seed

    def _powers(self):
        if self.max_power not in GRAM_POWERS:
            raise ValueError(f"gram.max_power must be one of {GRAM_POWERS[0]}..{GRAM_POWERS[-1]}, got {self.max_power}")
        return range(1, self.max_power + 1)

    def fit(self, data):
        powers = self._powers()
        labels = gather(data, np.arange(data.n), lambda b: b.labels)
        k = data.num_classes
        absent = sorted(set(range(k)) - set(labels[labels >= 0].tolist()))
        if (labels < 0).any() or absent:
            raise CacheError(f"gram fitted on {data.path}: needs labelled training rows of every class"
                             + (f" (class {absent[0]} has none)" if absent else ""))
        val = held_out(labels, self.seed)
        layers = data.layers(HOOK_SET)
        self.lo_, self.hi_ = {}, {}
        for layer in layers:
            c = data.shape(layer)[0]
            self.lo_[layer] = np.full((len(powers), k, c), np.inf)
            self.hi_[layer] = np.full((len(powers), k, c), -np.inf)
        at = 0
        for block in data.blocks():          # pass 1: bounds from the rows not held out
            fit = ~val[at:at + block.n]
            y = block.labels[fit]
            order = np.argsort(y, kind="stable")
            classes, starts = np.unique(y[order], return_index=True)
            at += block.n
            if not len(classes):
                continue
            for layer in layers:
                for i, p in enumerate(powers):
                    g = block.stat(layer, "act", f"gram{p}")[fit][order]
                    lo, hi = self.lo_[layer][i], self.hi_[layer][i]
                    lo[classes] = np.minimum(lo[classes], np.minimum.reduceat(g, starts, axis=0))
                    hi[classes] = np.maximum(hi[classes], np.maximum.reduceat(g, starts, axis=0))
        totals = {layer: 0.0 for layer in layers}
        at, count = 0, 0
        for block in data.blocks():          # pass 2: the held-out rows' deviations
            mine = val[at:at + block.n]
            y = block.labels[mine]
            at += block.n
            count += len(y)
            for layer in layers:
                dev = np.zeros(len(y))
                for i, p in enumerate(powers):
                    g = block.stat(layer, "act", f"gram{p}")[mine]
                    dev += deviation(self.lo_[layer][i][y], self.hi_[layer][i][y], g)
                totals[layer] += dev.sum()
        if count == 0:
            raise CacheError(f"gram fitted on {data.path}: no class has the 10 rows it needs to hold one out")
        self.norm_ = {layer: np.array(totals[layer] / count) for layer in layers}
        return self

    def score(self, data):
        """(n,) float64 minus the normalised Gram deviations from the predicted class's
        bounds, divided by its softmax probability."""
        logp = log_softmax(data.logits)
        pred, conf = logp.argmax(1), np.exp(logp.max(1))
        total = np.zeros(data.n)
        for layer in sorted(self.lo_):
            for i, p in enumerate(self._powers()):
                g = data.stat(layer, "act", f"gram{p}")
                total += deviation(self.lo_[layer][i][pred], self.hi_[layer][i][pred], g) / float(self.norm_[layer])
        return -total / conf
