"""Multi-layer Mahalanobis ensemble (Lee et al., NeurIPS 2018) as the GradNorm release
tunes and runs it (``tune_mahalanobis_hyperparameter.py``, ``tune_mahalanobis_hyperparams``).

The per-layer, input-preprocessed scores are recorded at extraction (``--maha-fit``;
``extract.mahalanobis``) as ``mahalanobis/scores`` (N, M, L), one slice per noise
magnitude. Fitting, on a validation cache:

* the first ``m`` = 500 usable rows and their pseudo-OOD copies
  (``mahalanobis/adversarial_scores``, recorded with ``--maha-adversarial``) train the
  regression; the next ``m`` rows and their copies choose the magnitude;
* for each magnitude, in the release's order, ``LogisticRegressionCV`` (its defaults) is
  fit on [ID rows, label 0; copies, label 1]; the confidence is ``-P(label 1)``; the
  magnitude with the lowest FPR at 95% ID recall on the selection rows wins (first on
  ties).

The release tunes on the first 1000 images of ImageNet's validation set, which is also the
ID test set it reports on; the validation cache defaults to the ID test cache for the same
reason, and a separate one can be named (``mahalanobis_ens.validation=NAME``).
"""
import json
import warnings

import numpy as np

from gradood.analyze.metrics import fpr_at_recall
from gradood.analyze.registry import register_score
from gradood.store.schema import CacheError


def recipe_key(attrs):
    """The recipe two caches must share (the pseudo-OOD option aside), as JSON text."""
    recipe = {k: v for k, v in (attrs.get("mahalanobis") or {}).items() if k not in ("adversarial", "adv_noise")}
    return json.dumps(recipe, sort_keys=True)


def has_adversarial(attrs):
    """Empty when a validation cache (its root ``attrs``) holds the pseudo-OOD copies the
    regression is fitted on, else what to extract."""
    if (attrs.get("mahalanobis") or {}).get("adversarial"):
        return ""
    return "it has no pseudo-OOD copies (extract it with --maha-fit TRAIN_CACHE --maha-adversarial)"


@register_score("mahalanobis_ens", title="Mahalanobis-LR", family="features", passes=("mahalanobis",), fit_memory="n M L",
                fit_requires=has_adversarial,
                fit_on="validation", fit_params=("m",),
                reference="Lee et al., NeurIPS 2018; GradNorm release tune_mahalanobis_hyperparameter.py")
class MahalanobisEnsemble:
    """m: validation rows for the regression (and as many for the selection). magnitude:
    score with this recorded magnitude instead of the chosen one. validation: name of the
    validation cache (default: the ID test cache).

    Fitted: ``coef_`` (M, L), ``intercept_`` (M,), ``fpr_`` (M,) selection FPR95 per
    magnitude, ``best_`` () index, ``magnitudes_`` (M,), ``recipe_`` () str.
    """

    def __init__(self, m=500, magnitude=None, validation=None):
        self.m, self.magnitude, self.validation = m, magnitude, validation

    def fit(self, data):
        from sklearn.linear_model import LogisticRegressionCV
        m = int(self.m)
        recipe = data.attrs.get("mahalanobis")
        if not recipe or not recipe.get("adversarial"):
            raise CacheError(f"{data.path}: no pseudo-OOD copies recorded; extract the "
                             "validation set with --maha-fit TRAIN_CACHE --maha-adversarial")
        if data.n < 2 * m:
            raise CacheError(f"{data.path}: {data.n} usable rows, the ensemble needs "
                             f"2m = {2 * m} (set mahalanobis_ens.m lower)")
        clean = data.maha_scores[: 2 * m].astype(np.float32)
        adv = data.maha_adversarial[: 2 * m].astype(np.float32)
        y = np.r_[np.zeros(m), np.ones(m)]
        n_mag = clean.shape[1]
        self.coef_, self.intercept_ = np.zeros((n_mag, clean.shape[2])), np.zeros(n_mag)
        self.fpr_ = np.zeros(n_mag)
        for j in range(n_mag):
            with warnings.catch_warnings():
                # The release's defaults (L2, lbfgs, accuracy); newer scikit-learn warns that
                # some defaults will change, which this pins by leaving them as they are now.
                warnings.simplefilter("ignore", FutureWarning)
                # The release passes n_jobs=-1; the fit does not depend on it, and serial
                # fitting keeps sweep workers from starting process pools of their own.
                reg = LogisticRegressionCV().fit(np.concatenate([clean[:m, j], adv[:m, j]]), y)
            self.coef_[j], self.intercept_[j] = reg.coef_[0], reg.intercept_[0]
            conf_in = -reg.predict_proba(clean[m:, j])[:, 1]
            conf_out = -reg.predict_proba(adv[m:, j])[:, 1]
            self.fpr_[j] = fpr_at_recall(conf_in, conf_out)
        best = 0
        for j in range(1, n_mag):    # strict improvement, as the release's `if fpr < best_fpr`
            if self.fpr_[j] < self.fpr_[best]:
                best = j
        self.best_ = np.array(best)
        self.magnitudes_ = np.array(recipe["magnitudes"], dtype=np.float64)
        self.recipe_ = np.array(recipe_key(data.attrs))
        return self

    def score(self, data):
        """(n,) float64 -P(OOD) of the fitted regression."""
        if recipe_key(data.attrs) != str(self.recipe_):
            raise CacheError(f"{data.path}: its Mahalanobis layer scores were recorded with "
                             "another --maha-fit or --maha-magnitude than the validation cache's; "
                             "extract both with the same options")
        mags = [float(v) for v in np.asarray(self.magnitudes_)]
        if self.magnitude is None:
            j = int(self.best_)
        elif float(self.magnitude) in mags:
            j = mags.index(float(self.magnitude))
        else:
            raise CacheError(f"mahalanobis_ens: magnitude {self.magnitude} was not recorded; recorded: {mags}")
        x = data.maha_scores[:, j].astype(np.float32).astype(np.float64)
        decision = x @ np.asarray(self.coef_)[j] + float(np.asarray(self.intercept_)[j])
        return -1.0 / (1.0 + np.exp(-decision))
