"""Metrics equal the authors' metric code, ties included."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench import authors_reference as ref
from gradood.analyze.metrics import METRICS, ood_metrics


@pytest.mark.parametrize("seed", range(6))
def test_gaia_convention_equals_their_loops(seed):
    rng = np.random.default_rng(seed)
    known = np.round(rng.normal(1.0, 1.0, 200 + seed), 1)   # rounding makes many ties
    novel = np.round(rng.normal(0.0, 1.0, 150), 1)
    got = ood_metrics(known, novel, "gaia")
    expected = ref.gaia_metrics(known, novel)
    for m in METRICS:
        assert abs(got[m] - expected[m]) <= 1e-10, m


@pytest.mark.parametrize("seed", range(6))
def test_sklearn_convention_equals_gradnorm_code(seed):
    rng = np.random.default_rng(seed)
    known = np.round(rng.normal(1.0, 1.0, 300), 1 if seed % 2 else 6)
    novel = np.round(rng.normal(0.2, 1.2, 250), 1 if seed % 2 else 6)
    got = ood_metrics(known, novel, "sklearn")
    assert got["FPR95"] == pytest.approx(ref.gradnorm_fpr95(known, novel), abs=1e-12)
    y = np.r_[np.ones(len(known)), np.zeros(len(novel))]
    assert got["AUROC"] == pytest.approx(roc_auc_score(y, np.r_[known, novel]), abs=1e-12)
    assert got["DetErr"] == pytest.approx(ref.gaia_metrics(known, novel)["DetErr"], abs=1e-12)


def test_perfect_and_reversed_separation():
    known, novel = np.arange(100, 200.0), np.arange(0, 100.0)
    for conv in ("sklearn", "gaia"):
        good = ood_metrics(known, novel, conv)
        assert good["AUROC"] == pytest.approx(1.0) and good["FPR95"] == 0.0 and good["DetErr"] == 0.0
        bad = ood_metrics(novel, known, conv)
        assert bad["AUROC"] == pytest.approx(0.0) and bad["FPR95"] == 1.0


def test_unknown_convention_names_the_valid_ones():
    with pytest.raises(ValueError, match="sklearn, gaia, openood"):
        ood_metrics([1.0], [0.0], "ood_pos")


def _openood_fpr_by_thresholds(known, novel):
    """OpenOOD's FPR@95TPR from its definition, by a loop: OOD is positive, the detector
    flags a sample when -score >= t; walking t from high to low, the FPR (ID flagged) at
    the first threshold whose OOD recall reaches 95%."""
    conf_ood, conf_id = -np.asarray(novel), -np.asarray(known)
    for t in np.sort(np.unique(np.r_[conf_ood, conf_id]))[::-1]:
        if np.mean(conf_ood >= t) >= 0.95:
            return float(np.mean(conf_id >= t))
    return 1.0


@pytest.mark.parametrize("seed", range(6))
def test_openood_convention_is_ood_positive(seed):
    """FPR@95 as OpenOOD v1.5 computes it (openood/evaluators/metrics.py): the share of ID
    samples flagged at 95% OOD recall, not the share of OOD accepted at 95% ID recall."""
    rng = np.random.default_rng(seed)
    known = rng.normal(1.0, 1.0, 300 + seed)
    novel = rng.normal(0.0, 1.5, 250)
    got = ood_metrics(known, novel, "openood")
    assert got["FPR95"] == pytest.approx(_openood_fpr_by_thresholds(known, novel), abs=1e-12)
    y = np.r_[np.ones(len(known)), np.zeros(len(novel))]
    assert got["AUROC"] == pytest.approx(roc_auc_score(y, np.r_[known, novel]), abs=1e-12)
    # not the ID-positive FPR95 of the seed papers
    assert got["FPR95"] != pytest.approx(ood_metrics(known, novel, "sklearn")["FPR95"], abs=1e-3)
    tied = (np.round(known, 1), np.round(novel, 1))
    assert 0 <= ood_metrics(*tied, "openood")["FPR95"] <= 1
