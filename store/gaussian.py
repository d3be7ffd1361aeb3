"""Class-conditional Gaussians with one shared covariance (Lee et al. 2018), in numpy.

Used by the Mahalanobis score (analysis) and by the multi-layer Mahalanobis pass
(extraction), so it sits below both stages.
"""
import numpy as np

from .schema import CacheError


def class_gaussian(x, y, where="training data"):
    """Class means (K', D), class ids (K',) and shared precision (D, D) of rows ``x`` (n, D)
    float64 labelled ``y`` (n,) int.

    The covariance is that of the class-centred rows divided by n (scikit-learn's
    ``EmpiricalCovariance``, which the authors use); its pseudo-inverse is the precision.
    It has rank at most n - K', so fewer than D + K' rows are refused (the pseudo-inverse of
    a rank-deficient covariance gives distances of no meaning): CacheError naming ``where``.
    """
    if np.any(y < 0):
        raise CacheError(f"{where}: Mahalanobis needs labelled training samples")
    classes = np.unique(y)
    n, d = x.shape
    if n - len(classes) < d:
        raise CacheError(f"{where}: {n} rows in {len(classes)} classes give a class-centred covariance "
                         f"of rank at most {n - len(classes)}, fewer than the {d} feature dimensions; "
                         f"fit on at least {d + len(classes)} rows (extract more with --split train "
                         "--limit N)")
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / len(x)
    return means, classes, np.linalg.pinv(cov, hermitian=True)


def fit_layer_gaussians(reader, layers):
    """Per layer: class means and shared precision of the spatial means of its output.

    reader: an open training cache (``store.reader.CacheReader``) holding
    ``layers/<layer>/act/mean`` for every layer. Skipped rows are left out. Returns
    ``{"layers": (L,) str, "classes": (K',), "means_<i>": (K', C_i), "precision_<i>":
    (C_i, C_i)}``.
    """
    from .schema import stat_path
    keep = ~reader.read_all("skipped").astype(bool)
    if keep.sum() == 0:
        raise CacheError(f"{reader.path}: no usable training samples")
    y = reader.read_all("labels")[keep]
    out = {"layers": np.array(layers)}
    for i, layer in enumerate(layers):
        path = stat_path(layer, "act", "mean")
        if not reader.has(path):
            raise CacheError(f"{reader.path} has no {path}; extract the training set with "
                             "--hook nac --policy pooled (the stage outputs' spatial means)")
        x = reader.read_all(path)[keep].astype(np.float64)
        out[f"means_{i}"], out["classes"], out[f"precision_{i}"] = class_gaussian(x, y, reader.path)
    return out
