"""OOD detection metrics in the conventions of the seed code and of OpenOOD v1.5.

``sklearn`` (GradNorm release, ``utils/test_utils.py::get_measures``): AUROC and AUPR by
scikit-learn (``roc_auc_score``, ``average_precision_score``; AUPR-Out with OOD positive
and negated scores); FPR95 = FPR at the ROC point whose recall is closest to 0.95.
``gaia`` (GAIA release, ``metrics.py::cal_metric``): FPR95 = fraction of OOD scores above
the ID score of ascending rank ``round(0.05 * n_id)``; AUROC, AUPR-In, AUPR-Out by the
trapezoidal rule over their tie-merged TP/FP curve.
``openood`` (OpenOOD v1.5, ``openood/evaluators/metrics.py``): OOD is the positive class;
FPR95 = the FPR of ``roc_curve(is_ood, -score)`` at the first point whose TPR (OOD
recall) reaches 0.95, i.e. the fraction of ID samples flagged at 95% OOD recall; AUROC =
``auc`` of that curve; AUPR-In / AUPR-Out = ``auc(recall, precision)`` of the
precision-recall curves with ID (score) / OOD (negated score) positive.
All report the detection error as GAIA computes it:
``min over thresholds of (ID rejected + OOD accepted) / (n_id + n_ood)``.
All values are fractions in [0, 1].
"""
import numpy as np
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

CONVENTIONS = ("sklearn", "gaia", "openood")
METRICS = ("FPR95", "AUROC", "AUPR-In", "AUPR-Out", "DetErr")


def _tp_fp_curve(known, novel):
    """TP and FP counts (length n+1) above each cut of the merged ascending order.

    Ties: ID samples leave first, then tied positions take the counts after the whole
    tie run, as GAIA's ``get_curve`` does.
    """
    known, novel = np.sort(known), np.sort(novel)
    values = np.concatenate([known, novel])
    is_known = np.concatenate([np.ones(len(known), bool), np.zeros(len(novel), bool)])
    order = np.argsort(values, kind="mergesort")
    values, is_known = values[order], is_known[order]
    tp = np.concatenate([[len(known)], len(known) - np.cumsum(is_known)])
    fp = np.concatenate([[len(novel)], len(novel) - np.cumsum(~is_known)])
    n = len(values)
    # run_end[j]: last index of the run of equal values containing j.
    new_run = np.concatenate([values[1:] != values[:-1], [True]])
    run_end = np.flip(np.minimum.accumulate(np.flip(np.where(new_run, np.arange(n), n))))
    tied = np.zeros(n + 1, bool)
    tied[1:n] = values[1:] == values[:-1]
    tp[tied] = tp[run_end[np.nonzero(tied)[0]] + 1]
    fp[tied] = fp[run_end[np.nonzero(tied)[0]] + 1]
    return tp, fp


def detection_error(known, novel):
    """GAIA's detection error: min over cuts of (ID rejected + OOD accepted) / total."""
    tp, fp = _tp_fp_curve(known, novel)
    return float(((tp[0] - tp + fp) / (tp[0] + fp[0])).min())


def _gaia(known, novel):
    tp, fp = _tp_fp_curve(known, novel)
    threshold = np.sort(known)[int(round(0.05 * len(known)))]
    tpr = np.concatenate([[1.0], tp / tp[0], [0.0]])
    fpr = np.concatenate([[1.0], fp / fp[0], [0.0]])
    denom = (tp + fp).astype(np.float64)
    denom[denom == 0] = -1
    pin_ind = np.concatenate([[True], denom > 0, [True]])
    pin = np.concatenate([[0.5], tp / denom, [0.0]])
    denom = (tp[0] - tp + fp[0] - fp).astype(np.float64)
    denom[denom == 0] = -1
    pout_ind = np.concatenate([[True], denom > 0, [True]])
    pout = np.concatenate([[0.0], (fp[0] - fp) / denom, [0.5]])
    return {
        "FPR95": float(np.sum(novel > threshold) / len(novel)),
        "AUROC": float(-np.trapezoid(1.0 - fpr, tpr)),
        "AUPR-In": float(-np.trapezoid(pin[pin_ind], tpr[pin_ind])),
        "AUPR-Out": float(np.trapezoid(pout[pout_ind], 1.0 - fpr[pout_ind])),
        "DetErr": float(((tp[0] - tp + fp) / (tp[0] + fp[0])).min()),
    }


def fpr_at_recall(known, novel, recall_level=0.95):
    """FPR at the distinct-threshold point whose ID recall is closest to ``recall_level``.

    As the GradNorm release's ``fpr_and_fdr_at_recall``: candidate points run from the
    lowest threshold reaching full recall up to the highest threshold, followed by an
    extra (recall 1, FP 0) point; the first closest candidate in that order wins.
    """
    y_true = np.concatenate([np.ones(len(known), bool), np.zeros(len(novel), bool)])
    y_score = np.concatenate([known, novel])
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[order], y_true[order]
    cut = np.r_[np.nonzero(np.diff(y_score))[0], y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[cut]
    fps = 1 + cut - tps
    last = int(tps.searchsorted(tps[-1]))
    recall = np.r_[(tps / tps[-1])[last::-1], 1.0]
    fps = np.r_[fps[last::-1], 0.0]
    return float(fps[np.argmin(np.abs(recall - recall_level))] / len(novel))


def _sklearn(known, novel):
    y = np.concatenate([np.ones(len(known)), np.zeros(len(novel))])
    s = np.concatenate([known, novel])
    return {
        "FPR95": fpr_at_recall(known, novel),
        "AUROC": float(roc_auc_score(y, s)),
        "AUPR-In": float(average_precision_score(y, s)),
        "AUPR-Out": float(average_precision_score(1 - y, -s)),
        "DetErr": detection_error(known, novel),
    }


def _openood(known, novel):
    is_ood = np.concatenate([np.zeros(len(known)), np.ones(len(novel))])
    conf = np.concatenate([known, novel])
    fpr, tpr, _ = roc_curve(is_ood, -conf)
    p_in, r_in, _ = precision_recall_curve(1 - is_ood, conf)
    p_out, r_out, _ = precision_recall_curve(is_ood, -conf)
    return {
        "FPR95": float(fpr[np.argmax(tpr >= 0.95)]),
        "AUROC": float(auc(fpr, tpr)),
        "AUPR-In": float(auc(r_in, p_in)),
        "AUPR-Out": float(auc(r_out, p_out)),
        "DetErr": detection_error(known, novel),
    }


def ood_metrics(known, novel, convention="sklearn"):
    """Metrics of ID scores ``known`` (n_id,) vs OOD scores ``novel`` (n_ood,): dict of METRICS.

    Scores are oriented higher = more in-distribution.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; choose one of: {', '.join(CONVENTIONS)}")
    known = np.asarray(known, dtype=np.float64)
    novel = np.asarray(novel, dtype=np.float64)
    if len(known) == 0 or len(novel) == 0:
        raise ValueError("need at least one ID and one OOD score")
    return {"gaia": _gaia, "openood": _openood, "sklearn": _sklearn}[convention](known, novel)
