"""NAC-UE (neuron activation coverage) from cached activations and gradients.

Semantics of the authors' ``KMNC`` / ``Estimator`` / ``get_state_func`` (METHODS.md):

* state of neuron c: ``s_c = sigmoid(alpha * O_c * G_c)``, O_c and G_c the SUMS over the
  H x W positions of the hooked output and of the gradient of
  ``sum_k -(1/K) log_softmax(z)_k`` w.r.t. it. From the cache: ``O = act mean * H*W`` and
  ``G = -(1/K) * (log_softmax_sum gradient mean) * H*W``. NAC's ``avgpool`` layer is the
  pooled head input x: ``O = x``, ``G = W^T (p - 1/K)``.
* thresholds: the authors' ``logspace(1e3, M)`` grid (``threshold_grid``), M points in
  [0, 1.2]; interval j is ``[t_j, t_{j+1})``, j < M - 1; a state outside every interval
  counts nowhere.
* fit on ID training samples: per layer, count per (interval, neuron); coverage =
  ``min(count / O, 1)``.
* score: per layer, mean over neurons of the coverage of the interval holding the
  sample's state; layers averaged with equal weight.

Hyperparameters per layer: ``M`` (even), ``O``, ``alpha``. The defaults are the authors'
CIFAR-10 configuration (``nac_cifar10.yml``): layers ``avgpool`` only, with avgpool
M=50, O=50, alpha=100; their per-layer values for the others (layer3 M=500, O=100,
alpha=1000; layer2 M=50, O=5, alpha=0.001; layer1 M=500, O=100, alpha=0.001) apply to
the first three ``nac`` stages when those are chosen; a fourth stage takes layer3's values.
"""
import numpy as np

from store.schema import CacheError

from . import aggregate as A
from .logits import log_softmax

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


def layer_hyper(reader, layer, hyper=None):
    """(M, O, alpha) for ``layer``: ``hyper[layer]`` when given, else the CIFAR-10 defaults."""
    if hyper and layer in hyper:
        M, O, alpha = hyper[layer]
        return int(M), float(O), float(alpha)
    if layer == AVGPOOL:
        return CIFAR10_HYPER[AVGPOOL]
    stages = reader.attrs["hook_sets"].get("nac", [])
    return CIFAR10_HYPER[min(stages.index(layer), 3)]


def nac_layers(reader, layers=None):
    """Validated NAC layer list: ``avgpool`` and/or names of the cache's ``nac`` hook set."""
    layers = list(DEFAULT_LAYERS) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    stages = reader.attrs["hook_sets"].get("nac", [])
    bad = [l for l in layers if l != AVGPOOL and l not in stages]
    if bad:
        raise CacheError(f"{reader.path}: NAC layers {bad} not extracted; available: "
                         f"{', '.join([AVGPOOL, *stages])} (extract with --score nac)")
    return layers


def pooled_output_and_grad(reader, layer, start, stop):
    """(O, G): (n, C) float64 sums over H x W of the layer output and of the NAC gradient."""
    if layer == AVGPOOL:
        x = reader.read("features", start, stop).astype(np.float64)
        z = reader.read("logits", start, stop).astype(np.float64)
        w, _ = reader.head()
        p = np.exp(log_softmax(z))
        return x, (p - 1.0 / z.shape[1]) @ w
    area = A.layer_area(reader, layer)
    k = int(reader.attrs["num_classes"])
    o = A.channel_stat(reader, layer, "act", "mean", start, stop) * area
    g = A.channel_stat(reader, layer, "log_softmax_sum", "mean", start, stop) * (-area / k)
    return o, g


def states(reader, layer, start, stop, alpha):
    """(n, C) neuron states sigmoid(alpha * O * G), float32 as the authors compute them.

    Single precision matters: a dead neuron (O*G ~ 1e-9) has state exactly 0.5 in float32,
    which is one of the thresholds, where float64 would give 0.4999999 and the bin below.
    """
    o, g = pooled_output_and_grad(reader, layer, start, stop)
    x = o.astype(np.float32) * g.astype(np.float32)
    with np.errstate(over="ignore"):
        return np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-alpha) * x))


def interval_index(s, grid):
    """(n, C) interval index of each state; -1 where it falls in no interval."""
    idx = np.searchsorted(grid, s, side="right") - 1
    idx[(idx < 0) | (idx >= len(grid) - 1)] = -1
    return idx


def fit_nac(train_reader, layers=None, hyper=None):
    """Per layer the counts (M - 1, C) of training states per interval."""
    fitted = {}
    for layer in nac_layers(train_reader, layers):
        M, _, alpha = layer_hyper(train_reader, layer, hyper)
        grid = threshold_grid(M)
        keep_all = ~train_reader.read_all("skipped").astype(bool)
        counts = None
        for a, b in train_reader.blocks():
            idx = interval_index(states(train_reader, layer, a, b, alpha), grid)[keep_all[a:b]]
            n_neurons = idx.shape[1]
            if counts is None:
                counts = np.zeros((M - 1) * n_neurons, dtype=np.int64)
            flat = (idx * n_neurons + np.arange(n_neurons))[idx >= 0]
            counts += np.bincount(flat, minlength=(M - 1) * n_neurons)
        fitted[f"counts/{layer}"] = counts.reshape(M - 1, n_neurons)
    return fitted


def score_nac(reader, start, stop, fitted, layers=None, hyper=None):
    """NAC-UE score (n,): coverage of each sample's states, averaged over neurons and layers."""
    layers = nac_layers(reader, layers)
    total = np.zeros(stop - start)
    for layer in layers:
        M, O, alpha = layer_hyper(reader, layer, hyper)
        coverage = np.minimum(fitted[f"counts/{layer}"] / O, 1.0)
        idx = interval_index(states(reader, layer, start, stop, alpha), threshold_grid(M))
        c = np.take_along_axis(coverage, np.maximum(idx, 0), axis=0)
        total += np.where(idx >= 0, c, 0.0).mean(axis=1)
    return total / len(layers)
