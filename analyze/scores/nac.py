"""NAC-UE, neuron activation coverage (Liu et al., "Neuron Activation Coverage:
Rethinking Out-of-distribution Detection and Generalization", ICLR 2024; code
BierOne/ood_coverage, ``KMNC`` / ``Estimator`` / ``get_state_func``).

* state of neuron c: ``s_c = sigmoid(alpha * O_c * G_c)``, O_c and G_c the SUMS over the
  H x W positions of the layer output and of the gradient of ``sum_k -(1/K)
  log_softmax(z)_k`` w.r.t. it. From the cache: ``O = act mean * H*W`` and ``G = -(1/K) *
  (log_softmax_sum gradient mean) * H*W``. NAC's ``avgpool`` layer is the pooled head
  input x, in closed form: ``O = x``, ``G = W^T (p - 1/K)`` (no backward pass).
* thresholds: the authors' ``logspace(1e3, M)`` grid (``threshold_grid``), M points in
  [0, 1.2]; interval j is ``[t_j, t_{j+1})``, j < M - 1; a state outside every interval
  counts nowhere.
* fit on ID training samples: per layer, count per (interval, neuron); coverage =
  ``min(count / O, 1)``.
* score: per layer, mean over neurons of the coverage of the interval holding the
  sample's state; layers averaged with equal weight.

Fit streamed: the counts are summed block by block (memory: (M - 1) x C integers per
layer). ``O`` is a count of training states, so the coverage saturates as the fitting
set grows: the authors fit on a subset of their training images (OpenOOD's ``valid_num``),
and at 150k rows the CIFAR-10 O = 50 saturates every interval a sample can reach, so
every sample scores the same (AUROC 50; the evaluation then stops with "constant
score"). Scale O with the fitting rows (O = 50 at n rows becomes about 50 n' / n at n'),
or fit on a training cache of the authors' size (``--limit``).

Hyperparameters per layer: ``M`` (even), ``O``, ``alpha``. The defaults are the authors'
CIFAR-10 configuration (``nac_cifar10.yml``): layers ``avgpool`` only, with avgpool
M=50, O=50, alpha=100; their per-layer values for the others (layer3 M=500, O=100,
alpha=1000; layer2 M=50, O=5, alpha=0.001; layer1 M=500, O=100, alpha=0.001) apply to
the first three ``nac`` stages when those are chosen; a fourth stage takes layer3's
values. ``hyper`` = {layer: [M, O, alpha]} sets them per layer; ``M``, ``O``, ``alpha``
set them for every chosen layer (the sweep's axes). Layers inside the network need the
``nac`` hook set (one backward pass at extraction): ask for them with
``--param nac.layers=avgpool,layer3`` at extraction.
"""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score
from gradood.store.schema import CacheError

AVGPOOL = "avgpool"
# (M, O, alpha) of the authors' CIFAR-10 configuration, by role.
CIFAR10_HYPER = {AVGPOOL: (50, 50, 100.0), 0: (500, 100, 0.001), 1: (50, 5, 0.001),
                 2: (500, 100, 1000.0), 3: (500, 100, 1000.0)}
DEFAULT_LAYERS = (AVGPOOL,)


def threshold_grid(M):
    """The authors' M thresholds (float64, increasing, 0 ... 1.2) for an even M >= 4."""
    M = int(M)
    if M < 4 or M % 2:
        raise ValueError(f"NAC M must be an even number >= 4 (the authors' grid), got {M}")
    half = M // 2
    left = np.log(np.linspace(1.0, np.sqrt(1000.0), half)) / np.log(1000.0)
    grid = np.concatenate([left[:-1], (1.0 - left)[::-1]])
    grid[-1] += 1e-2
    return np.append(grid, 1.2)


def _as_list(layers):
    if layers is None:
        return list(DEFAULT_LAYERS)
    return [layers] if isinstance(layers, str) else list(layers)


def _needs(p):
    inner = [l for l in _as_list(p["layers"]) if l != AVGPOOL]
    return [("nac", "act", "mean"), ("nac", "log_softmax_sum", "mean")] if inner else []


def _layers_defined(p, attrs):
    """Why ``nac.layers`` names layers this cache's model does not have (empty when fine)."""
    stages = (attrs.get("hook_sets") or {}).get("nac")
    bad = [l for l in _as_list(p["layers"]) if l != AVGPOOL and l not in (stages or [])]
    if not bad:
        return ""
    return (f"nac.layers names {', '.join(bad)}, which "
            + (f"is not among its NAC layers ({', '.join([AVGPOOL, *stages])})" if stages else
               "needs the stage outputs (the nac hook set), not extracted for this cache")
            + "; NAC layers are avgpool or the model's stages (pipeline.py scores --arch ARCH)")


def nac_layers(data, layers=None):
    """Validated NAC layer list: ``avgpool`` and/or names of the cache's ``nac`` hook set."""
    layers = _as_list(layers)
    stages = data.attrs["hook_sets"].get("nac", [])
    bad = [l for l in layers if l != AVGPOOL and l not in stages]
    if bad:
        raise CacheError(f"{data.path}: NAC layers {bad} not extracted; available: "
                         f"{', '.join([AVGPOOL, *stages])} (extract with --param nac.layers="
                         f"{','.join(layers)})")
    return layers


def pooled_output_and_grad(data, layer):
    """(O, G): (n, C) float64 sums over H x W of the layer output and of the NAC gradient."""
    if layer == AVGPOOL:
        x, z, w = data.features, data.logits, data.head_weight
        p = np.exp(log_softmax(z))
        return x, (p - 1.0 / z.shape[1]) @ w
    area = data.area(layer)
    o = data.stat(layer, "act", "mean") * area
    g = data.stat(layer, "log_softmax_sum", "mean") * (-area / data.num_classes)
    return o, g


def states(data, layer, alpha):
    """(n, C) neuron states sigmoid(alpha * O * G), float32 as the authors compute them.

    Single precision matters: a dead neuron (O*G ~ 1e-9) has state exactly 0.5 in float32,
    which is one of the thresholds, where float64 would give 0.4999999 and the bin below.
    """
    o, g = pooled_output_and_grad(data, layer)
    x = o.astype(np.float32) * g.astype(np.float32)
    with np.errstate(over="ignore"):
        return np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-alpha) * x))


def interval_index(s, grid):
    """(n, C) interval index of each state; -1 where it falls in no interval."""
    idx = np.searchsorted(grid, s, side="right") - 1
    idx[(idx < 0) | (idx >= len(grid) - 1)] = -1
    return idx


def _nac_layer_set(attrs):
    return [AVGPOOL, *attrs["hook_sets"].get("nac", [])]


@register_score(
    "nac", title="NAC-UE", family="gradient", default=True, needs=_needs, fit_on="train",
    defined_on=_layers_defined, fit_memory="M C per layer",
    linear_head=lambda p: AVGPOOL in _as_list(p["layers"]),     # its avgpool gradient is (p - 1/K) W
    fit_params=("layers", "hyper", "M", "alpha"),
    reference="Liu et al., ICLR 2024 (NAC-UE); BierOne/ood_coverage",
    layer_set=_nac_layer_set, paper={"NAC-UE (paper, CIFAR-10 config)": {}},
    grid=[{"layers": ["each"], "M": [10, 50, 500], "O": [1, 5, 50], "alpha": [0.001, 1, 100, 1000]}])
class NAC:
    """NAC-UE. Fitted attribute ``counts_``: {layer: (M - 1, C) int64 training states per
    interval}. ``score`` returns (n,) float64 coverage averaged over neurons and layers."""

    def __init__(self, layers=None, hyper=None, M=None, O=None, alpha=None):
        self.layers, self.hyper, self.M, self.O, self.alpha = layers, hyper, M, O, alpha

    def layer_hyper(self, data, layer):
        """(M, O, alpha) for ``layer``: M/O/alpha, else ``hyper[layer]``, else the CIFAR-10 defaults."""
        if self.hyper and layer in self.hyper:
            M, O, alpha = self.hyper[layer]
        elif layer == AVGPOOL:
            M, O, alpha = CIFAR10_HYPER[AVGPOOL]
        else:
            stages = data.attrs["hook_sets"].get("nac", [])
            M, O, alpha = CIFAR10_HYPER[min(stages.index(layer), 3)]
        M = self.M if self.M is not None else M
        O = self.O if self.O is not None else O
        alpha = self.alpha if self.alpha is not None else alpha
        return int(M), float(O), float(alpha)

    def fit(self, data):
        """Count the training states per (interval, neuron) of every chosen layer."""
        self.counts_ = {}
        layers = nac_layers(data, self.layers)
        for block in data.blocks():
            if block.n == 0:
                continue
            for layer in layers:
                M, _, alpha = self.layer_hyper(data, layer)
                idx = interval_index(states(block, layer, alpha), threshold_grid(M))
                n_neurons = idx.shape[1]
                flat = (idx * n_neurons + np.arange(n_neurons))[idx >= 0]
                counts = np.bincount(flat, minlength=(M - 1) * n_neurons).astype(np.int64)
                self.counts_[layer] = self.counts_.get(layer, 0) + counts.reshape(M - 1, n_neurons)
        return self

    def score(self, data):
        layers = nac_layers(data, self.layers)
        total = np.zeros(data.n)
        for layer in layers:
            M, O, alpha = self.layer_hyper(data, layer)
            coverage = np.minimum(self.counts_[layer] / O, 1.0)
            idx = interval_index(states(data, layer, alpha), threshold_grid(M))
            c = np.take_along_axis(coverage, np.maximum(idx, 0), axis=0)
            total += np.where(idx >= 0, c, 0.0).mean(axis=1)
        return total / len(layers)
