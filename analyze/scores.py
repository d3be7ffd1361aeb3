"""OOD scores from a cache. Every score is oriented higher = more in-distribution.

``SCORES[name]`` is a ``ScoreSpec``: ``compute(reader, start, stop, **params)`` returns a
float64 array (n,) for rows ``[start, stop)``; fitted scores also have
``fit(train_reader, **params) -> {name: ndarray}`` and receive that dict as ``fitted=``.
Definitions follow the authors' code (METHODS.md): GAIA ``cal_method.py``, GradNorm
``test_ood.py``; the feature-based baselines are in ``analyze.feature_scores``, NAC-UE in
``analyze.nac``, gradient tracking in ``analyze.tracking``.

Gradient scores take sweepable parameters (``analyze.sweep``):
    spatial  per-channel reduction over H x W of the stored gradient statistics:
             ``nonzero`` (fraction of non-zero entries), ``mean``, ``sum``, ``max``
             (max |v|), ``l1`` (sum |v|), ``l2`` (sqrt of sum v^2)
    channel  aggregation over the concatenated channels of the chosen layers:
             ``sq_mean`` (mean of squares, GAIA), ``mean``, ``l1``, ``l2``, ``max`` (of |r|)
    layers   subset of the hook set's layers (default all); objective: which gradient.
"""
from typing import Callable, NamedTuple, Optional

import numpy as np

from store.recipes import missing_for
from store.schema import TRACKING_PATH, CacheError, odin_path

from . import aggregate as A
from . import feature_scores as F
from . import maha_ensemble as ME
from . import nac as N
from . import tracking as TR
from .logits import energy, log_softmax

SPATIAL = {"nonzero": "nonzero", "mean": "mean", "sum": "mean", "max": "abs_max",
           "l1": "abs_mean", "l2": "sq_mean"}
CHANNEL = ("sq_mean", "mean", "l1", "l2", "max")


def _logits(reader, start, stop):
    return reader.read("logits", start, stop).astype(np.float64)


def score_msp(reader, start, stop):
    """Maximum softmax probability, max_k p_k."""
    return np.exp(log_softmax(_logits(reader, start, stop))).max(axis=1)


def score_maxlogit(reader, start, stop):
    """Maximum logit, max_k z_k."""
    return _logits(reader, start, stop).max(axis=1)


def score_energy(reader, start, stop, temperature=1.0):
    """Negative free energy, T * logsumexp(z / T)."""
    return energy(_logits(reader, start, stop), temperature)


def score_gradnorm(reader, start, stop, temperature=1.0):
    """GradNorm: L1 norm of dL/dW for L = sum_k -log_softmax(z / T)_k.

    dL/dW is the outer product of dL/dz = (K p - 1) / T and the head input x, so its L1
    norm is (1/T) * sum_k |K p_k - 1| * sum_j |x_j| (no backward pass needed).
    """
    z = _logits(reader, start, stop)
    x = reader.read("features", start, stop).astype(np.float64)
    p = np.exp(log_softmax(z, temperature))
    k = z.shape[1]
    return np.abs(k * p - 1).sum(axis=1) * np.abs(x).sum(axis=1) / temperature


def score_odin(reader, start, stop, temperature=None, epsilon=None):
    """ODIN: max softmax probability at temperature T of the perturbed input's logits.

    (temperature, epsilon) must be a pair recorded at extraction (root attribute ``odin``);
    left out, the first recorded pair is used.
    """
    pairs = reader.attrs.get("odin") or []
    if temperature is None and epsilon is None and pairs:
        temperature, epsilon = pairs[0]
    if [float(temperature), float(epsilon)] not in [[float(t), float(e)] for t, e in pairs]:
        raise CacheError(f"{reader.path}: no ODIN pass with T={temperature}, epsilon={epsilon}; "
                         f"recorded pairs: {pairs or 'none'} (extract with --odin T,EPS)")
    z = reader.read(odin_path(temperature, epsilon), start, stop).astype(np.float64)
    return np.exp(log_softmax(z, float(temperature))).max(axis=1)


def spatial_stat(reader, layer, source, spatial, start, stop):
    """(n, C) per-channel spatial reduction ``spatial`` (see module docstring), float64."""
    if spatial not in SPATIAL:
        raise ValueError(f"unknown spatial reduction {spatial!r}; choose one of: {', '.join(SPATIAL)}")
    if spatial == "nonzero":
        return A.nonzero_fraction(reader, layer, source, start, stop)
    v = A.channel_stat(reader, layer, source, SPATIAL[spatial], start, stop)
    area = A.layer_area(reader, layer)
    if spatial in ("sum", "l1"):
        return v * area
    if spatial == "l2":
        return np.sqrt(v * area)
    return v


def aggregate_channels(r, channel):
    """Aggregate (n, C) per-channel values into (n,) by ``channel`` (see module docstring)."""
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


def _layers(reader, hook_set, layers):
    known = reader.attrs["hook_sets"].get(hook_set, [])
    if layers is None:
        return known
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [l for l in layers if l not in known]
    if unknown:
        raise ValueError(f"layers {unknown} are not in hook set {hook_set!r} of {reader.path}: {known}")
    return layers


def score_gaia_z(reader, start, stop, layers=None, spatial="nonzero", channel="sq_mean",
                 objective="max_logit"):
    """GAIA-Z: minus the mean over all channels of all ``bn`` layers of r_c^2, r_c the
    fraction of non-zero entries of the max-logit gradient in channel c (the defaults);
    other ``spatial``/``channel``/``objective``/``layers`` give the sweep's variants."""
    layers = _layers(reader, "bn", layers)
    r = np.concatenate([spatial_stat(reader, l, objective, spatial, start, stop) for l in layers], axis=1)
    return -aggregate_channels(r, channel)


def score_gaia_a(reader, start, stop, layers=None, spatial="mean", channel="sq_mean"):
    """GAIA-A: minus mean_c (|a_c| / out)^2 (the defaults).

    ``out = sqrt(mean_c |m_c|)``, m the spatial mean of the log-softmax-sum gradient at the
    last ``before_head`` layer; a the spatial means of the feature-sum gradient at the
    other ``before_head`` layers (or the ``layers`` subset of them), concatenated in
    module order. ``spatial``/``channel`` change the reduction of a and the aggregation.
    """
    *inner, last = reader.attrs["hook_sets"]["before_head"]
    inner = inner if layers is None else [l for l in _layers(reader, "before_head", layers) if l != last]
    m = A.channel_stat(reader, last, "log_softmax_sum", "mean", start, stop)
    out = np.sqrt(np.abs(m).mean(axis=1))[:, None]
    a = np.abs(np.concatenate([spatial_stat(reader, l, "feature_sum", spatial, start, stop)
                               for l in inner], axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return -aggregate_channels(a / out, channel)


class ScoreSpec(NamedTuple):
    """A score: its table title, ``compute`` and, for fitted scores, ``fit``.

    fit_source: ``train`` (fitted on the ID training cache, ``--fit-on``) or
    ``validation`` (fitted on a validation cache named by the score's ``validation``
    parameter, default the ID test cache).
    """
    title: str
    compute: Callable
    fit: Optional[Callable] = None
    fit_source: str = "train"


SCORES = {
    "gaia_a": ScoreSpec("GAIA-A", score_gaia_a),
    "gaia_z": ScoreSpec("GAIA-Z", score_gaia_z),
    "gradnorm": ScoreSpec("GradNorm", score_gradnorm),
    "nac": ScoreSpec("NAC-UE", N.score_nac, N.fit_nac),
    "tracking": ScoreSpec("GradTrack", TR.score_tracking),
    "msp": ScoreSpec("MSP", score_msp),
    "maxlogit": ScoreSpec("MaxLogit", score_maxlogit),
    "energy": ScoreSpec("Energy", score_energy),
    "odin": ScoreSpec("ODIN", score_odin),
    "mahalanobis": ScoreSpec("Mahalanobis", F.score_mahalanobis, F.fit_mahalanobis),
    "react": ScoreSpec("ReAct", F.score_react, F.fit_react),
    "ash": ScoreSpec("ASH", F.score_ash),
    "knn": ScoreSpec("KNN", F.score_knn, F.fit_knn),
    "vim": ScoreSpec("ViM", F.score_vim, F.fit_vim),
    "mahalanobis_ens": ScoreSpec("Mahalanobis-LR", ME.score_ensemble, ME.fit_ensemble, "validation"),
}
SCORE_TITLES = {name: spec.title for name, spec in SCORES.items()}


def check_score(score):
    """Raise ValueError naming the valid scores when ``score`` is unknown."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)} (or all)")


def needs_fit(score):
    """True when ``score`` is fitted on an ID training cache first."""
    check_score(score)
    return SCORES[score].fit is not None


def fit_source(score, id_name, fit_on=None, params=None):
    """Name of the cache ``score`` is fitted on: the ``validation`` parameter (default the
    ID test cache) for validation-fitted scores, else ``fit_on`` or ``<id>_train``.
    ``fit_score`` and ``compute_score`` ignore the ``validation`` parameter."""
    if SCORES[score].fit_source == "validation":
        return (params or {}).get("validation", id_name)
    return fit_on or f"{id_name}_train"


def check_cache_serves(reader, score):
    """Raise CacheError when the cache lacks what ``score`` reads, saying how to re-extract."""
    problems = missing_for(score, reader.attrs)
    if problems:
        raise CacheError(f"{reader.path} lacks what {score} needs: {'; '.join(problems)}. "
                         f"Re-extract with --score {score}")


def fit_score(train_reader, score, **params):
    """Fit ``score`` on an open training cache: ``{name: ndarray}`` (empty for unfitted scores)."""
    check_score(score)
    if SCORES[score].fit is None:
        return {}
    check_cache_serves(train_reader, score)
    params.pop("validation", None)
    return SCORES[score].fit(train_reader, **params)


def compute_score(reader, score, fitted=None, **params):
    """Score ``score`` for every sample of the cache, block by block: float64 (N,).

    fitted: the output of ``fit_score`` for fitted scores (required for them).
    """
    check_score(score)
    check_cache_serves(reader, score)
    spec = SCORES[score]
    params.pop("validation", None)
    if spec.fit is not None:
        if fitted is None:
            raise ValueError(f"score {score} must be fitted on an ID training cache first (fit_score)")
        params = {**params, "fitted": fitted}
    parts = [spec.compute(reader, a, b, **params) for a, b in reader.blocks()]
    return np.concatenate(parts) if parts else np.empty(0)
