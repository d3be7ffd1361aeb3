"""ASH, activation shaping (Djurisic et al., ICLR 2023; andrijazz/ash ``ash.py``).

Per sample, keep the top ``100 - percentile`` % entries of the activation, zero the rest
(``ash_p``); ``ash_b`` sets the kept entries to s1 / k; ``ash_s`` scales the pruned
activation by exp(s1 / s2) (s1, s2: sums before/after pruning; k = n - round(n p / 100)
kept of n entries); then the head and the energy.

Placement: the release calls ``apply_ash`` on the activation AFTER global average
pooling, a (N, C, 1, 1) tensor, in every ImageNet and CIFAR model it ships; OpenOOD's
``ASHNet`` does the same. So ``ash`` works on the cached pooled features and needs
nothing else. Defaults as the release's configs: ``ash_s`` at percentile 90 (ImageNet
ResNet-50 and MobileNetV2, ``imagenet_config.yml``); the CIFAR presets set 95
(``cifar10_config.yml``/``cifar100_config.yml``). OpenOOD runs ASH-B with its percentile
searched over 65..95 (default 90): ``--param ash.variant=ash_b``.

``ash_map`` prunes the last spatial feature map BEFORE pooling (``penultimate`` hook,
stored as a map): a different method, kept as an ablation.
"""
import numpy as np

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score
from gradood.store.schema import CacheError

ASH_VARIANTS = ("ash_s", "ash_b", "ash_p")
REFERENCE = "Djurisic et al., ICLR 2023; andrijazz/ash"


def kept_entries(flat, percentile):
    """Indices (n, k) and values (n, k) of the k = n_entries - round(n_entries p / 100)
    largest entries of each row of ``flat`` (n, n_entries), as ASH and SCALE count them."""
    size = flat.shape[1]
    k = size - int(np.round(size * percentile / 100.0))
    if k <= 0:      # a property of the cache (too few entries) at this percentile: a limit, not a bug
        raise CacheError(f"percentile {percentile} keeps no entry of a {size}-entry activation (a lower "
                         "percentile, or a wider layer)")
    keep = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    return keep, np.take_along_axis(flat, keep, axis=1)


def ash_prune(a, percentile, variant):
    """ASH on activations ``a`` (n, ...) float64 (pooled (n, C) or maps (n, C, H, W));
    returns the shaped activations, same shape."""
    n = a.shape[0]
    flat = a.reshape(n, -1)
    keep, kept = kept_entries(flat, percentile)
    k = keep.shape[1]
    s1 = flat.sum(axis=1)
    out = np.zeros_like(flat)
    if variant == "ash_p":
        np.put_along_axis(out, keep, kept, axis=1)
    elif variant == "ash_b":
        np.put_along_axis(out, keep, np.repeat((s1 / k)[:, None], k, axis=1), axis=1)
    else:
        np.put_along_axis(out, keep, kept, axis=1)
        s2 = kept.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out *= np.exp(s1 / s2)[:, None]
    return out.reshape(a.shape)


def _check(percentile):
    if not 0 <= percentile < 100:
        raise ValueError(f"ASH percentile must be in [0, 100), got {percentile}")


@register_score("ash", linear_head=True, title="ASH", family="features", default=True, reference=REFERENCE,
                choices={"variant": ASH_VARIANTS}, paper={"ASH-S (release placement)": {}},
                describe=lambda p, attrs: f"{p['variant'].upper().replace('_', '-')} at p={p['percentile']:g}, after pooling",
                grid=[{"variant": list(ASH_VARIANTS), "percentile": [65, 80, 90, 95]}])
def ash(data, percentile=90.0, variant="ash_s"):
    """(n,) float64 energy of the head on the ASH-shaped pooled features."""
    _check(percentile)
    shaped = ash_prune(data.features, percentile, variant)
    return logsumexp(shaped @ data.head_weight.T + data.head_bias)


def pooled_map_defined(params, attrs):
    """Why the mean of the ``penultimate`` map is not the head's input on this model
    (empty where it is): scores that pool a changed map into the head need that."""
    layer = ((attrs.get("hook_sets") or {}).get("penultimate") or [None])[0]
    if layer is None:
        return ""
    channels = attrs["layer_shapes"][layer][0]
    dim = attrs.get("feature_dim")
    if dim is not None and channels != dim:
        return (f"its last map {layer} has {channels} channels but the head reads {dim} features "
                "(a hidden layer sits between the pool and the head)")
    if (attrs.get("layer_layouts") or {}).get(layer) == "NTC":
        return (f"{layer} is a token sequence; the head reads one token (or a pooling the "
                "cache does not describe), not the mean over the tokens")
    return ""


@register_score("ash_map", linear_head=True, title="ASH on the map (ablation)", family="features", reference=REFERENCE,
                needs=[("penultimate", "act", "map")], choices={"variant": ASH_VARIANTS},
                defined_on=pooled_map_defined,
                describe=lambda p, attrs: f"{p['variant']} at p={p['percentile']:g} on the map before pooling (not the release's placement)")
def ash_map(data, percentile=90.0, variant="ash_s"):
    """(n,) float64 energy of the head on the average-pooled ASH-shaped last feature map."""
    _check(percentile)
    layer = data.layers("penultimate")[0]
    maps = data.map(layer, "act").astype(np.float64)
    pooled = ash_prune(maps, percentile, variant).mean(axis=(2, 3))
    return logsumexp(pooled @ data.head_weight.T + data.head_bias)
