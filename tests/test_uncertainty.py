"""Error bars: bootstrap intervals against the analytic ones, DeLong's test against a
direct implementation, the vectorised resamples against explicit ones, and the CLI and
API doors (--ci, --compare)."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import norm

from gradood import analyze
from gradood.analyze.metrics import ood_metrics
from gradood.analyze.uncertainty import (_multiplicities, _resampled, auroc, bootstrap, delong, hanley_mcneil,
                                 interval, resampled_metrics)
from gradood.pipeline import cli
from gradood.store.synthetic import write_synthetic


def delong_direct(xa, ya, xb, yb):
    """DeLong et al. (1988) from the kernel psi(x, y) = 1[x > y] + 0.5 1[x == y], written out
    over all pairs (O(n1 n0) memory): the AUCs, their covariance, the z test."""
    def kernel(x, y):
        return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    m, n = len(xa), len(ya)
    ka, kb = kernel(xa, ya), kernel(xb, yb)
    v10 = np.stack([ka.mean(axis=1), kb.mean(axis=1)])      # per ID sample
    v01 = np.stack([ka.mean(axis=0), kb.mean(axis=0)])      # per OOD sample
    s = np.cov(v10) / m + np.cov(v01) / n
    theta = np.array([ka.mean(), kb.mean()])
    z = (theta[0] - theta[1]) / np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    return theta, 2 * norm.sf(abs(z))


def test_bootstrap_interval_matches_the_analytic_ones():
    """Binormal scores (AUROC about 0.76): the bootstrap interval's ends lie within 10 % of
    the analytic interval's width of Hanley-McNeil's and of DeLong's normal interval."""
    rng = np.random.default_rng(0)
    known, novel = rng.normal(1.0, 1.0, 3000), rng.normal(0.0, 1.0, 2000)
    lo, hi = bootstrap(known, novel, level=95, resamples=2000, seed=1)["AUROC"]
    v10 = np.array([np.mean(novel < k) for k in known])
    v01 = np.array([np.mean(known > y) for y in novel])
    se = np.sqrt(v10.var(ddof=1) / len(known) + v01.var(ddof=1) / len(novel))
    a = auroc(known, novel)
    for alo, ahi in (hanley_mcneil(known, novel, 95), (a - 1.959964 * se, a + 1.959964 * se)):
        width = ahi - alo
        assert abs(lo - alo) <= 0.1 * width and abs(hi - ahi) <= 0.1 * width, ((lo, hi), (alo, ahi))
    assert a == ood_metrics(known, novel)["AUROC"]


def test_delong_equals_a_direct_implementation():
    rng = np.random.default_rng(2)
    xa, ya = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    xb, yb = xa + rng.normal(0, 0.8, 300), ya + rng.normal(0, 0.8, 200)
    xb[:20] = np.round(xb[:20])              # ties within and across the sets
    yb[:20] = np.round(yb[:20])
    theta, p = delong_direct(xa, ya, xb, yb)
    got = delong(xa, ya, xb, yb)
    assert abs(got["auroc_a"] - theta[0]) < 1e-12 and abs(got["auroc_b"] - theta[1]) < 1e-12
    assert abs(got["p"] - p) <= 1e-10 * max(p, 1e-300)
    assert delong(xa, ya, xa, ya)["p"] == 1.0
    with pytest.raises(ValueError, match="same samples"):
        delong(xa, ya, xb[:10], yb)


def test_vectorised_resamples_equal_explicit_ones():
    """Each resample's AUROC and FPR95 equal the metrics of the expanded resampled arrays
    (Mann-Whitney AUROC = scikit-learn's; FPR95 = the gaia convention's rule)."""
    rng = np.random.default_rng(3)
    known, novel = np.round(rng.normal(1, 1, 120), 1), np.round(rng.normal(0, 1, 80), 1)   # ties
    w, u = _multiplicities(rng, 120, 7), _multiplicities(rng, 80, 7)
    assert (w.sum(axis=1) == 120).all() and (u.sum(axis=1) == 80).all()
    ia, ib = np.argsort(known, kind="stable"), np.argsort(novel, kind="stable")
    au, fpr = _resampled(known[ia], novel[ib], w[:, ia], u[:, ib])
    for r in range(7):
        k, n = np.repeat(known, w[r]), np.repeat(novel, u[r])
        assert abs(au[r] - ood_metrics(k, n)["AUROC"]) < 1e-12
        assert abs(fpr[r] - ood_metrics(k, n, "gaia")["FPR95"]) < 1e-12


def test_paired_resamples_share_their_draws_and_seeds_repeat():
    rng = np.random.default_rng(4)
    known, novel = rng.normal(1, 1, 500), rng.normal(0, 1, 300)
    same = resampled_metrics(known, novel, 200, seed=5, other=(known, novel))
    assert not same["AUROC"].any() and not same["FPR95"].any()      # a score minus itself: 0 in every resample
    a = resampled_metrics(known, novel, 200, seed=5)
    np.testing.assert_array_equal(a["AUROC"], resampled_metrics(known, novel, 200, seed=5)["AUROC"])
    assert not np.array_equal(a["AUROC"], resampled_metrics(known, novel, 200, seed=6)["AUROC"])
    assert interval(a["AUROC"], 90)[0] > interval(a["AUROC"], 99)[0]


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ci")
    write_synthetic(str(d / "syn_train.h5"), 1500, num_classes=8, dim=16, seed=1, noise=2.0, split="train")
    write_synthetic(str(d / "syn.h5"), 600, num_classes=8, dim=16, seed=2, noise=2.0)
    write_synthetic(str(d / "near.h5"), 300, num_classes=8, dim=16, seed=3, novel=0.5, noise=2.0)
    write_synthetic(str(d / "far.h5"), 300, num_classes=8, dim=16, seed=4, novel=1.0, noise=2.0)
    return str(d)


def test_cli_ci_and_compare_equal_the_api(folder, tmp_path):
    out = str(tmp_path / "results")
    res = CliRunner().invoke(cli, ["analyze", "--cache-dir", folder, "--id", "syn", "--ood", "near", "--ood", "far",
                                   "--score", "msp,energy,mahalanobis", "--ci", "90", "--resamples", "300",
                                   "--compare", "mahalanobis,msp", "--results", out])
    assert res.exit_code == 0, res.output
    assert "[" in res.output and "DeLong p" in res.output and "percentile bootstrap" in res.output
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert os.path.exists(os.path.join(out, "compare_mahalanobis_vs_msp.md"))
    df = analyze.evaluate(folder, "syn", ["msp", "energy", "mahalanobis"], ood=["near", "far"], ci=90, resamples=300)
    for _, row in df.iterrows():
        lo, hi = saved["intervals"][row["score"]][row["ood"]]["AUROC"]
        assert (row["AUROC_low"], row["AUROC_high"]) == (lo, hi)
        assert lo <= row["AUROC"] <= hi or row["ood"] == "Average"
    cmp = analyze.compare(folder, "syn", "mahalanobis", "msp", ood=["near", "far"], level=90, resamples=300)
    for _, row in cmp.iterrows():
        want = saved["comparisons"]["mahalanobis,msp"][row["ood"]]
        assert (row["AUROC_low"], row["AUROC_high"]) == tuple(want["AUROC"])
        assert row["AUROC_diff"] == want["difference"]["AUROC"]
    with open(os.path.join(out, "summary.csv")) as f:
        assert "near AUROC low" in f.readline()


def test_compare_names_two_scores(folder, tmp_path):
    res = CliRunner().invoke(cli, ["analyze", "--cache-dir", folder, "--id", "syn", "--ood", "near",
                                   "--score", "msp", "--compare", "msp", "--results", str(tmp_path / "r")])
    assert res.exit_code != 0 and "two different scores" in res.output
    res = CliRunner().invoke(cli, ["analyze", "--cache-dir", folder, "--id", "syn", "--ood", "near",
                                   "--score", "msp", "--compare", "msp,nosuch", "--results", str(tmp_path / "r")])
    assert res.exit_code != 0 and "nosuch" in res.output


@pytest.fixture(scope="session")
def members(tmp_path_factory):
    """Three 'checkpoints' (synthetic worlds of three seeds) over the same rows."""
    base = tmp_path_factory.mktemp("seeds")
    dirs = []
    for s in range(3):
        d = str(base / f"s{s}")
        write_synthetic(os.path.join(d, "syn_train.h5"), 1200, num_classes=6, dim=12, seed=1, world_seed=s,
                        noise=2.0, split="train")
        write_synthetic(os.path.join(d, "syn.h5"), 400, num_classes=6, dim=12, seed=2, world_seed=s, noise=2.0)
        write_synthetic(os.path.join(d, "near.h5"), 200, num_classes=6, dim=12, seed=3, world_seed=s, novel=0.5, noise=2.0)
        write_synthetic(os.path.join(d, "far.h5"), 200, num_classes=6, dim=12, seed=4, world_seed=s, novel=1.0, noise=2.0)
        dirs.append(d)
    return dirs


def test_checkpoints_report_mean_std_and_a_deep_ensemble(members, tmp_path):
    from gradood.analyze.evaluator import run_evaluation
    from gradood.analyze.logits import log_softmax
    from gradood.store.reader import CacheReader
    out = str(tmp_path / "res")
    res = CliRunner().invoke(cli, ["analyze", "--checkpoint-dirs", ",".join(members), "--id", "syn",
                                   "--ood", "near", "--ood", "far", "--score", "msp,mahalanobis", "--results", out])
    assert res.exit_code == 0, res.output
    assert "±" in res.output and "Deep ensemble" in res.output and "ddof 0" in res.output
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)["results"]
    runs = [run_evaluation(d, "syn", ["near", "far"], ["msp", "mahalanobis"]) for d in members]
    for name in ("msp", "mahalanobis"):
        for d in ("near", "far", "Average"):
            values = [r.results[name][d]["AUROC"] for r in runs]
            assert saved[name][d]["AUROC"]["mean"] == pytest.approx(np.mean(values), abs=1e-15)
            assert saved[name][d]["AUROC"]["std"] == pytest.approx(np.std(values), abs=1e-15)
    probs = {}
    for dataset in ("syn", "far"):
        ps = []
        for d in members:
            with CacheReader(os.path.join(d, f"{dataset}.h5")) as r:
                ps.append(np.exp(log_softmax(r.read_all("logits").astype(np.float64))))
        probs[dataset] = np.mean(ps, axis=0).max(axis=1)
    assert saved["ensemble"]["far"]["AUROC"]["mean"] == ood_metrics(probs["syn"], probs["far"])["AUROC"]
    df = analyze.evaluate_checkpoints(members, "syn", ["msp"], ood=["near", "far"])
    row = df[(df.score == "msp") & (df.ood == "far")].iloc[0]
    assert row["AUROC_mean"] == saved["msp"]["far"]["AUROC"]["mean"]


def test_checkpoints_refuse_the_same_weights_or_other_images(members, tmp_path):
    import shutil
    res = CliRunner().invoke(cli, ["analyze", "--checkpoint-dirs", f"{members[0]},{members[0]}", "--id", "syn",
                                   "--ood", "near", "--score", "msp", "--results", str(tmp_path / "a")])
    assert res.exit_code != 0 and "given twice" in res.output
    copy = shutil.copytree(members[0], str(tmp_path / "copy"))
    res = CliRunner().invoke(cli, ["analyze", "--checkpoint-dirs", f"{members[0]},{copy}", "--id", "syn",
                                   "--ood", "near", "--score", "msp", "--results", str(tmp_path / "a")])
    assert res.exit_code != 0 and "same weights" in res.output
    other = str(tmp_path / "other")
    write_synthetic(os.path.join(other, "syn.h5"), 300, num_classes=6, dim=12, seed=2, world_seed=9, noise=2.0)
    write_synthetic(os.path.join(other, "near.h5"), 200, num_classes=6, dim=12, seed=3, world_seed=9, novel=0.5)
    res = CliRunner().invoke(cli, ["analyze", "--checkpoint-dirs", f"{members[0]},{other}", "--id", "syn",
                                   "--ood", "near", "--score", "msp", "--results", str(tmp_path / "b")])
    assert res.exit_code != 0 and "different images" in res.output
