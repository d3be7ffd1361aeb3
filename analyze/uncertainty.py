"""Uncertainty of the detection metrics over samples: bootstrap intervals, paired
differences between two scores, DeLong's test, Hanley and McNeil's analytic interval.

Scores are oriented higher = more in-distribution; ``known`` holds the ID scores (n1,),
``novel`` the OOD scores (n0,). AUROC here is P(known > novel) + P(tie) / 2 (the
Mann-Whitney statistic, which every metric convention's AUROC equals up to tie handling).

The bootstrap resamples the ID and the OOD sets independently (each with replacement, its
own size), seeded, ``B`` = 1,000 resamples by default, and returns the percentile
interval. It is vectorised: a resample is a vector of multiplicities, so AUROC of all
resamples is one weighted sum over the sorted scores, and FPR95 one weighted quantile:
30 scores x 6 OOD sets x 1,000 resamples run in seconds. FPR95 in a resample is the
fraction of OOD samples scoring above the ID score of ascending rank round(0.05 n1) (the
``gaia`` convention's definition); its point estimate in tables stays that of the chosen
convention.
"""
import numpy as np
from scipy.stats import norm

RESAMPLES = 1000
FEW_ROWS = 10       # fewer rows on a side than this: the caption warns that intervals and tests mean little
CHUNK = 50          # resamples computed at once (memory: CHUNK x (n1 + n0) float64)


def _as_scores(known, novel):
    known, novel = np.asarray(known, np.float64), np.asarray(novel, np.float64)
    if not len(known) or not len(novel):
        raise ValueError("need at least one ID and one OOD score")
    return known, novel


def auroc(known, novel):
    """Mann-Whitney AUROC P(known > novel) + P(tie)/2, float."""
    known, novel = _as_scores(known, novel)
    v10, _ = placements(known, novel)
    return float(v10.mean())


def placements(known, novel):
    """DeLong's structural components: ``v10`` (n1,) the fraction of OOD scores below each
    ID score (ties count half), ``v01`` (n0,) the fraction of ID scores above each OOD
    score (ties half). Both average to the AUROC."""
    known, novel = _as_scores(known, novel)
    s = np.sort(novel)
    below = np.searchsorted(s, known, side="left")
    tied = np.searchsorted(s, known, side="right") - below
    v10 = (below + 0.5 * tied) / len(novel)
    k = np.sort(known)
    above = len(known) - np.searchsorted(k, novel, side="right")
    tied = np.searchsorted(k, novel, side="right") - np.searchsorted(k, novel, side="left")
    v01 = (above + 0.5 * tied) / len(known)
    return v10, v01


def hanley_mcneil(known, novel, level=95):
    """``(low, high)`` Hanley and McNeil's (1982) normal interval of the AUROC."""
    known, novel = _as_scores(known, novel)
    a, n1, n0 = auroc(known, novel), len(known), len(novel)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)
    z = norm.ppf(0.5 + level / 200)
    return a - z * np.sqrt(var), a + z * np.sqrt(var)


def delong(known_a, novel_a, known_b, novel_b):
    """DeLong, DeLong and Clarke-Pearson's (1988) test of two correlated AUROCs: scores
    ``a`` and ``b`` of the same ID samples (row for row) and the same OOD samples. Returns
    ``{"auroc_a", "auroc_b", "difference", "se", "z", "p"}`` (two-sided p)."""
    known_a, novel_a = _as_scores(known_a, novel_a)
    known_b, novel_b = _as_scores(known_b, novel_b)
    if known_a.shape != known_b.shape or novel_a.shape != novel_b.shape:
        raise ValueError("DeLong's test pairs two scores of the same samples: shapes differ "
                         f"({known_a.shape}/{novel_a.shape} vs {known_b.shape}/{novel_b.shape})")
    v10a, v01a = placements(known_a, novel_a)
    v10b, v01b = placements(known_b, novel_b)
    s10 = np.cov(np.stack([v10a, v10b])) if len(v10a) > 1 else np.zeros((2, 2))
    s01 = np.cov(np.stack([v01a, v01b])) if len(v01a) > 1 else np.zeros((2, 2))
    cov = s10 / len(v10a) + s01 / len(v01a)
    diff = v10a.mean() - v10b.mean()
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    se = float(np.sqrt(max(var, 0.0)))
    z = diff / se if se > 0 else (0.0 if diff == 0 else np.inf * np.sign(diff))
    return {"auroc_a": float(v10a.mean()), "auroc_b": float(v10b.mean()), "difference": float(diff),
            "se": se, "z": float(z), "p": float(2 * norm.sf(abs(z)))}


def _multiplicities(rng, n, b):
    """(b, n) int: how often each of n samples is drawn in b resamples of size n (uniform
    draws with replacement, counted)."""
    draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n)


def _resampled(known, novel, w, u, recall=0.95):
    """AUROC and FPR95 (b,) of resamples given by ID multiplicities ``w`` (b, n1) and OOD
    multiplicities ``u`` (b, n0); ``known`` and ``novel`` sorted ascending."""
    n1, n0 = len(known), len(novel)
    # AUROC: sum_i w_i [ sum_j u_j (novel_j < known_i) + 0.5 sum_j u_j (novel_j == known_i) ]
    cu = np.concatenate([np.zeros((len(u), 1)), np.cumsum(u, axis=1)], axis=1)
    lo = np.searchsorted(novel, known, side="left")
    hi = np.searchsorted(novel, known, side="right")
    below = cu[:, lo] + 0.5 * (cu[:, hi] - cu[:, lo])
    au = (w * below).sum(axis=1) / (n1 * n0)
    # FPR95 as GAIA's: the resampled ID score of ascending rank round(0.05 n1), then the
    # OOD fraction strictly above it
    cw = np.cumsum(w, axis=1)
    cut = np.argmax(cw > np.round((1 - recall) * n1), axis=1)
    threshold = known[cut]
    above = n0 - cu[np.arange(len(u)), np.searchsorted(novel, threshold, side="right")]
    return au, above / n0


def resampled_metrics(known, novel, resamples=RESAMPLES, seed=0, ood_stream=1, other=None):
    """``{"AUROC": (B,), "FPR95": (B,)}``: the metrics of ``resamples`` bootstrap resamples,
    ID and OOD drawn independently with replacement.

    The ID resamples come from ``seed`` alone and the OOD ones from ``(seed, ood_stream)``,
    so several OOD sets evaluated with one seed and different streams share the ID
    resamples (their average over sets is then a resample of the average). other:
    ``(known_b, novel_b)``, a second score of the same samples: the arrays are then those
    of the paired difference (this score minus the other), both scores seeing the same
    draws in each resample.
    """
    known, novel = _as_scores(known, novel)
    rng_id = np.random.default_rng([seed, 0])
    rng_ood = np.random.default_rng([seed, int(ood_stream)])
    ia, ib = np.argsort(known, kind="stable"), np.argsort(novel, kind="stable")
    if other is not None:
        kb, nb = _as_scores(*other)
        if kb.shape != known.shape or nb.shape != novel.shape:
            raise ValueError("a paired comparison needs two scores of the same samples")
        ja, jb = np.argsort(kb, kind="stable"), np.argsort(nb, kind="stable")
    out = {"AUROC": [], "FPR95": []}
    for start in range(0, resamples, CHUNK):
        b = min(CHUNK, resamples - start)
        w, u = _multiplicities(rng_id, len(known), b), _multiplicities(rng_ood, len(novel), b)
        au, fpr = _resampled(known[ia], novel[ib], w[:, ia], u[:, ib])
        if other is not None:
            au_b, fpr_b = _resampled(kb[ja], nb[jb], w[:, ja], u[:, jb])
            au, fpr = au - au_b, fpr - fpr_b
        out["AUROC"].append(au)
        out["FPR95"].append(fpr)
    return {m: np.concatenate(v) for m, v in out.items()}


def interval(values, level=95):
    """``(low, high)``: the central ``level`` % percentile interval of resampled ``values``."""
    half = (100 - float(level)) / 2
    low, high = np.percentile(np.asarray(values, np.float64), [half, 100 - half])
    return float(low), float(high)


def bootstrap(known, novel, level=95, resamples=RESAMPLES, seed=0, other=None):
    """Percentile bootstrap intervals ``{"AUROC": (low, high), "FPR95": (low, high)}``
    (fractions) of one score on one OOD set (``resampled_metrics``); with ``other`` those of
    the paired difference, plus ``"p"``, DeLong's p-value of the AUROC difference."""
    draws = resampled_metrics(known, novel, resamples, seed, other=other)
    out = {m: interval(v, level) for m, v in draws.items()}
    if other is not None:
        out["p"] = delong(known, novel, *other)["p"]
    return out


def excludes_zero(interval):
    """True when the interval (low, high) lies entirely on one side of zero."""
    low, high = interval
    return low > 0 or high < 0
