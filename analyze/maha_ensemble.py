"""Multi-layer Mahalanobis ensemble: logistic regression over the per-layer scores.

The per-layer, input-preprocessed scores are recorded at extraction (``--maha-fit``;
``extract.mahalanobis``) as ``mahalanobis/scores`` (N, M, L), one slice per noise
magnitude. As the GradNorm release's ``tune_mahalanobis_hyperparams``:

* validation data: the first ``m`` = 500 usable rows of a validation cache and their
  pseudo-OOD copies (``mahalanobis/adversarial_scores``, recorded with
  ``--maha-adversarial``) train the regression; the next ``m`` rows and their copies
  choose the magnitude;
* for each magnitude, in the release's order, ``LogisticRegressionCV`` (its defaults) is fit
  on [ID rows, label 0; copies, label 1]; the confidence is ``-P(label 1)``; the
  magnitude with the lowest FPR at 95% ID recall on the selection rows wins (first on
  ties).

The release tunes on the first 1000 images of ImageNet's validation set, which is also the
ID test set it reports on; the validation cache defaults to the ID test cache for the same
reason, and a separate one can be named (``mahalanobis_ens.validation=NAME``). This needs
validation data and so is an extraction-time option, not a default score.
"""
import json
import warnings

import numpy as np

from store.schema import MAHA_ADVERSARIAL as ADVERSARIAL_PATH
from store.schema import MAHA_SCORES as SCORES_PATH
from store.schema import CacheError

from .metrics import fpr_at_recall



def _recipe_key(attrs):
    """The recipe two caches must share (the pseudo-OOD option aside)."""
    recipe = {k: v for k, v in (attrs.get("mahalanobis") or {}).items() if k not in ("adversarial", "adv_noise")}
    return json.dumps(recipe, sort_keys=True)


def fit_ensemble(val_reader, m=500, magnitude=None):
    """Fit one regression per magnitude on a validation cache and pick the magnitude.

    val_reader: an open cache with ``mahalanobis/scores`` and ``.../adversarial_scores``
    and at least 2m usable rows. Returns ``{"coef": (M, L), "intercept": (M,), "fpr":
    (M,) selection FPR95 per magnitude, "best": () index, "magnitudes": (M,), "recipe":
    () str}``. magnitude: accepted for symmetry with ``score_ensemble`` and unused (every
    recorded magnitude is fitted).
    """
    from sklearn.linear_model import LogisticRegressionCV

    recipe = val_reader.attrs.get("mahalanobis")
    if not recipe or not recipe.get("adversarial"):
        raise CacheError(f"{val_reader.path}: no pseudo-OOD copies recorded; extract the "
                         "validation set with --maha-fit TRAIN_CACHE --maha-adversarial")
    keep = np.flatnonzero(~val_reader.read_all("skipped").astype(bool))
    if len(keep) < 2 * m:
        raise CacheError(f"{val_reader.path}: {len(keep)} usable rows, the ensemble needs "
                         f"2m = {2 * m} (set mahalanobis_ens.m lower)")
    rows = keep[: 2 * m]
    clean = val_reader.read_all(SCORES_PATH)[rows].astype(np.float32)
    adv = val_reader.read_all(ADVERSARIAL_PATH)[rows].astype(np.float32)
    y = np.r_[np.zeros(m), np.ones(m)]
    n_mag = clean.shape[1]
    coef, intercept, fpr = np.zeros((n_mag, clean.shape[2])), np.zeros(n_mag), np.zeros(n_mag)
    for j in range(n_mag):
        with warnings.catch_warnings():
            # The release's defaults (L2, lbfgs, accuracy); newer scikit-learn warns that
            # some defaults will change, which this pins by leaving them as they are now.
            warnings.simplefilter("ignore", FutureWarning)
            # The release passes n_jobs=-1; the fit does not depend on it, and serial
            # fitting keeps sweep workers from starting process pools of their own.
            reg = LogisticRegressionCV().fit(np.concatenate([clean[:m, j], adv[:m, j]]), y)
        coef[j], intercept[j] = reg.coef_[0], reg.intercept_[0]
        conf_in = -reg.predict_proba(clean[m:, j])[:, 1]
        conf_out = -reg.predict_proba(adv[m:, j])[:, 1]
        fpr[j] = fpr_at_recall(conf_in, conf_out)
    best = 0
    for j in range(1, n_mag):    # strict improvement, as the release's `if fpr < best_fpr`
        if fpr[j] < fpr[best]:
            best = j
    return {"coef": coef, "intercept": intercept, "fpr": fpr, "best": np.array(best),
            "magnitudes": np.array(recipe["magnitudes"], dtype=np.float64),
            "recipe": np.array(_recipe_key(val_reader.attrs))}


def score_ensemble(reader, start, stop, fitted, magnitude=None, m=None):
    """-P(OOD) of the fitted regression on rows ``[start, stop)``: float64 (n,).

    magnitude: one of the recorded magnitudes (default: the one chosen on validation).
    The cache must hold the scores of the same recipe (layers, magnitudes, fit) as the
    validation cache. m: the fitting parameter, unused here.
    """
    if _recipe_key(reader.attrs) != str(fitted["recipe"]):
        raise CacheError(f"{reader.path}: its Mahalanobis layer scores were recorded with "
                         "another --maha-fit or --maha-magnitude than the validation cache's; "
                         "extract both with the same options")
    mags = [float(v) for v in np.asarray(fitted["magnitudes"])]
    if magnitude is None:
        j = int(fitted["best"])
    elif float(magnitude) in mags:
        j = mags.index(float(magnitude))
    else:
        raise CacheError(f"mahalanobis_ens: magnitude {magnitude} was not recorded; recorded: {mags}")
    x = reader.read(SCORES_PATH, start, stop)[:, j].astype(np.float32).astype(np.float64)
    decision = x @ np.asarray(fitted["coef"])[j] + float(np.asarray(fitted["intercept"])[j])
    return -1.0 / (1.0 + np.exp(-decision))
