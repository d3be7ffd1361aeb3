"""Baselines from cached penultimate features and the stored head: Mahalanobis, ReAct,
ASH, KNN, ViM. All oriented higher = more in-distribution; float64 (n,) per block.

Fitted ones take the ID training cache (``fit_<name>(train_reader, **params)`` returns a
dict of arrays, saved next to the results) and then score any cache. Definitions and
default constants:

* Mahalanobis (Lee et al. 2018, feature level, no input preprocessing): class means and
  one shared covariance of the training features; score ``max_c -0.5 (x - mu_c)^T P
  (x - mu_c)`` with P the pseudo-inverse of the covariance (their ``sample_estimator``
  and ``get_Mahalanobis_score`` at noise 0).
* ReAct (Sun et al. 2021): clip features at the ``percentile``-th percentile (default 90)
  of all training feature entries, then energy of ``W min(x, c) + b``.
* ASH (Djurisic et al. 2023): per sample, keep the top ``100 - percentile`` % entries of
  the last feature map (default percentile 90, OpenOOD's), zero the rest; ``ash_p`` stops
  there, ``ash_b`` sets the kept entries to s1/k, ``ash_s`` scales the pruned map by
  exp(s1 / s2) (s1, s2: sums before/after pruning); then average pooling, the head and
  the energy. The map is ``layers/<penultimate>/act/map`` (stored for score ``ash``).
* KNN (Sun et al. 2022): minus the Euclidean distance to the k-th nearest (default k=50,
  their CIFAR-10 value) L2-normalised training feature (x / (||x|| + 1e-10)).
* ViM (Wang et al. 2022): origin u = -pinv(W) b; principal subspace of dimension ``dim``
  of the training features centred at u (default: 1000 if D >= 1500, 512 if D >= 768,
  else D/2, as the paper chooses); score = energy(z) - alpha * ||(x - u) P_perp||, alpha =
  mean max-logit / mean residual norm on the training set.
"""
import numpy as np
from sklearn import config_context
from sklearn.neighbors import NearestNeighbors

from store.schema import CacheError, stat_path

from .logits import energy, logsumexp

FIT_BLOCK = 4096


def training_arrays(train_reader, *names):
    """Whole datasets ``names`` of the training cache, skipped rows removed (float64 except labels)."""
    keep = ~train_reader.read_all("skipped").astype(bool)
    out = []
    for name in names:
        v = train_reader.read_all(name)[keep]
        out.append(v if name == "labels" else v.astype(np.float64))
    if keep.sum() == 0:
        raise CacheError(f"{train_reader.path}: no usable training samples")
    return out


def _features(reader, start, stop):
    return reader.read("features", start, stop).astype(np.float64)


# ------------------------------------------------------------------------- Mahalanobis
def _class_gaussian(x, y, where):
    """Class means (K', D), class ids (K',), shared precision (D, D) of rows ``x`` labelled ``y``.

    The covariance is that of the class-centred rows (divided by n, as scikit-learn's
    ``EmpiricalCovariance`` the authors use); its pseudo-inverse is the precision.
    """
    if np.any(y < 0):
        raise CacheError(f"{where}: Mahalanobis needs labelled training samples")
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / len(x)
    return means, classes, np.linalg.pinv(cov, hermitian=True)


def fit_mahalanobis(train_reader):
    """Class means (K', D), their class ids (K',) and the shared precision (D, D)."""
    x, y = training_arrays(train_reader, "features", "labels")
    means, classes, precision = _class_gaussian(x, y, train_reader.path)
    return {"means": means, "classes": classes, "precision": precision}


def fit_layer_gaussians(train_reader, layers):
    """Per layer: class means and shared precision of the spatial means of its output.

    For the multi-layer Mahalanobis recorded at extraction (``extract.mahalanobis``).
    Reads ``layers/<layer>/act/mean`` of the training cache. Returns ``{"layers": (L,)
    str, "classes": (K',), "means_<i>": (K', C_i), "precision_<i>": (C_i, C_i)}``.
    """
    (y,) = training_arrays(train_reader, "labels")
    out = {"layers": np.array(layers)}
    for i, layer in enumerate(layers):
        path = stat_path(layer, "act", "mean")
        if not train_reader.has(path):
            raise CacheError(f"{train_reader.path} has no {path}; extract the training set with "
                             "the default scores (NAC-UE stores the stage outputs' means)")
        (x,) = training_arrays(train_reader, path)
        out[f"means_{i}"], out["classes"], out[f"precision_{i}"] = _class_gaussian(x, y, train_reader.path)
    return out


def score_mahalanobis(reader, start, stop, fitted):
    """max over classes of -0.5 * squared Mahalanobis distance to the class mean."""
    x = _features(reader, start, stop)
    means, prec = fitted["means"], fitted["precision"]
    best = np.full(len(x), -np.inf)
    for mu in means:
        d = x - mu
        best = np.maximum(best, -0.5 * np.einsum("nd,de,ne->n", d, prec, d))
    return best


# ------------------------------------------------------------------------------ ReAct
def fit_react(train_reader, percentile=90.0):
    """Clipping threshold: the ``percentile``-th percentile of all training feature entries."""
    (x,) = training_arrays(train_reader, "features")
    return {"threshold": np.array(np.percentile(x.ravel(), percentile))}


def score_react(reader, start, stop, fitted, percentile=90.0):
    """Energy of the head applied to features clipped at the fitted threshold."""
    w, b = reader.head()
    x = np.minimum(_features(reader, start, stop), float(fitted["threshold"]))
    return logsumexp(x @ w.T + b)


# -------------------------------------------------------------------------------- ASH
ASH_VARIANTS = ("ash_s", "ash_b", "ash_p")


def ash_prune(maps, percentile, variant):
    """ASH on feature maps (n, C, H, W) float64; returns the shaped maps, same shape."""
    if variant not in ASH_VARIANTS:
        raise ValueError(f"unknown ASH variant {variant!r}; choose one of: {', '.join(ASH_VARIANTS)}")
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    size = flat.shape[1]
    k = size - int(np.round(size * percentile / 100.0))   # entries kept, as ASH counts them
    if k <= 0:
        raise ValueError(f"ASH percentile {percentile} keeps no entry of a {size}-entry map")
    keep = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    kept = np.take_along_axis(flat, keep, axis=1)
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
    return out.reshape(maps.shape)


def score_ash(reader, start, stop, percentile=90.0, variant="ash_s"):
    """Energy of the head on the average-pooled ASH-shaped last feature map."""
    layers = reader.attrs["hook_sets"].get("penultimate")
    layer = layers[0]
    w, b = reader.head()
    row_bytes = 8 * int(np.prod(reader.attrs["layer_shapes"][layer]))
    step = max(1, (128 << 20) // row_bytes)   # bounded memory: about 128 MiB of maps at a time
    parts = []
    for a in range(start, stop, step):
        maps = reader.read(stat_path(layer, "act", "map"), a, min(a + step, stop)).astype(np.float64)
        pooled = ash_prune(maps, percentile, variant).mean(axis=(2, 3))
        parts.append(logsumexp(pooled @ w.T + b))
    return np.concatenate(parts)


# -------------------------------------------------------------------------------- KNN
def normalise(x):
    """Rows divided by their L2 norm (+1e-10, as the KNN release)."""
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def fit_knn(train_reader, k=50):
    """Normalised training features (n, D)."""
    (x,) = training_arrays(train_reader, "features")
    if k > len(x):
        raise ValueError(f"KNN k={k} exceeds the {len(x)} training samples of {train_reader.path}")
    return {"bank": normalise(x)}


def score_knn(reader, start, stop, fitted, k=50):
    """Minus the distance to the k-th nearest normalised training feature."""
    bank = fitted["bank"]
    if k > len(bank):
        raise ValueError(f"KNN k={k} exceeds the {len(bank)} fitted training samples")
    with config_context(working_memory=128):   # distance matrix chunks of at most 128 MiB
        nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank)
        dist, _ = nn.kneighbors(normalise(_features(reader, start, stop)))
    return -dist[:, -1]


# -------------------------------------------------------------------------------- ViM
def vim_default_dim(feature_dim):
    """Principal-subspace dimension the ViM paper uses for a feature dimension."""
    if feature_dim >= 1500:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


def fit_vim(train_reader, dim=None):
    """Origin u (D,), residual basis (D, D - dim) and the scale alpha."""
    w, b = train_reader.head()
    (x,) = training_arrays(train_reader, "features")
    dim = vim_default_dim(x.shape[1]) if dim is None else int(dim)
    if not 0 < dim < x.shape[1]:
        raise ValueError(f"ViM dim must be between 1 and {x.shape[1] - 1}, got {dim}")
    u = -np.linalg.pinv(w) @ b
    centred = x - u
    cov = centred.T @ centred / len(x)
    vals, vecs = np.linalg.eigh(cov)
    residual = vecs[:, np.argsort(-vals)[dim:]]
    vlogit = np.linalg.norm(centred @ residual, axis=1)
    alpha = (x @ w.T + b).max(axis=1).mean() / vlogit.mean()
    return {"u": u, "residual": residual, "alpha": np.array(alpha)}


def score_vim(reader, start, stop, fitted, dim=None):
    """Energy minus alpha times the norm of the feature's residual (outside the principal subspace)."""
    w, b = reader.head()
    x = _features(reader, start, stop)
    vlogit = np.linalg.norm((x - fitted["u"]) @ fitted["residual"], axis=1) * float(fitted["alpha"])
    return energy(x @ w.T + b) - vlogit
