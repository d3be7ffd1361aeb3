"""The OpenOOD v1.5 protocol on a data root laid out as its download script does: image
lists, near/far tables, OpenOOD's CSV shape, parameters tuned on validation sets only,
and the same scores as the same images read as ImageFolders."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from gradood.pipeline import cli
from gradood.store.reader import CacheReader


@pytest.fixture(scope="module")
def openood(tmp_path_factory, openood_root, openood_caches):
    """``(base, root, ckpt, folders, cache)``: a folder for this module's outputs and the
    session's OpenOOD stand-in root, checkpoint and caches (read-only)."""
    root, ckpt, folders = openood_root
    return tmp_path_factory.mktemp("openood"), root, ckpt, folders, openood_caches


def test_openood_layout_end_to_end(openood):
    base, root, ckpt, folders, cache = openood
    with CacheReader(os.path.join(cache, "cifar10.h5")) as r:
        assert r.attrs["benchmark"] == "openood_cifar10" and r.attrs["odin"] == [[1000.0, 0.0014, True]]
        assert (r.read_all("labels") >= 0).all()
    with CacheReader(os.path.join(cache, "tin.h5")) as r:
        assert (r.read_all("labels") == -1).all()
        assert list(r.read_all("paths")) == [os.path.join(root, "images_classic", line.split()[0]) for line in
                                             open(os.path.join(root, "benchmark_imglist/cifar10/test_tin.txt"))]
    out, results = str(base / "scores"), str(base / "results")
    res = CliRunner().invoke(cli, ["analyze", "--benchmark", "openood_cifar10", "--cache-dir", cache, "--score", "all",
                                   "--metrics", "openood", "--scores-out", out, "--results", results])
    assert res.exit_code == 0, res.output
    assert "Near AUROC" in res.output and "Far AUROC" in res.output and "near-OOD: cifar100" in res.output
    assert "classifier accuracy" in res.output and "OOD positive" in res.output
    saved = json.loads(open(os.path.join(results, "results.json")).read())
    assert saved["ood"] == ["cifar100", "tin", "mnist", "svhn", "texture", "places365"]
    # 30 default detectors; SHE (no class the random model gets right), KNN (k=50 > 40
    # training rows) and the covariance fits ViM, Mahalanobis and RMDS (40 rows < 512
    # feature dimensions) cannot be fitted on this tiny training list: left out with a note
    assert len(saved["results"]) >= 24 and "note: she left out" in res.output
    assert "note: vim left out" in res.output and "rows than feature dimensions" in res.output
    for d in saved["ood"]:
        assert os.path.exists(os.path.join(out, "msp", f"{d}.csv"))
    rows = list(csv.reader(open(os.path.join(results, "ood", "energy.csv"))))
    assert rows[0] == ["dataset", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]
    assert [r[0] for r in rows[1:]] == ["cifar100", "tin", "nearood", "mnist", "svhn", "texture", "places365", "farood"]
    near = saved["results"]["energy"]["nearood"]["AUROC"]
    assert near == pytest.approx(np.mean([saved["results"]["energy"][d]["AUROC"] for d in ("cifar100", "tin")]))
    assert "tin_val" not in saved["ood"] and "cifar10_val" not in saved["ood"]

    # the same images read as ImageFolders give the same scores (the default batch size, as the
    # session caches: the same batches, so the same float sums)
    folder_cache = str(base / "folder_cache")
    res = CliRunner().invoke(cli, ["extract", "--arch", "resnet18", "--num-classes", "10", "--checkpoint", ckpt,
                                   "--preprocess", "demo", "--dataset", f"cifar10={folders['cifar10']}",
                                   "--dataset", f"tin={folders['tin']}", "--dataset", f"cifar10_train={folders['cifar10_train']}",
                                   "--cache-dir", folder_cache, "--quiet", "--odin", "1000,0.0014,std"])
    assert res.exit_code == 0, res.output
    for score in ("msp", "gaia_z", "odin", "react"):
        res = CliRunner().invoke(cli, ["analyze", "--cache-dir", folder_cache, "--id", "cifar10", "--score", score,
                                       "--scores-out", str(base / "folder_scores"), "--results", str(base / "r2")])
        assert res.exit_code == 0, res.output
        for d in ("cifar10", "tin"):
            a = {r["path"]: r["score"] for r in csv.DictReader(open(os.path.join(out, score, f"{d}.csv")))}
            b = {r["path"]: r["score"] for r in csv.DictReader(open(base / "folder_scores" / score / f"{d}.csv"))}
            assert a == b and len(a) > 0, (score, d)


def test_tuning_uses_validation_caches_only(openood):
    base, root, ckpt, _, cache = openood
    res = CliRunner().invoke(cli, ["analyze", "--benchmark", "openood_cifar10", "--cache-dir", cache, "--score",
                                   "knn,energy,msp", "--tune-on", "tin_val", "--metrics", "openood",
                                   "--results", str(base / "tuned")])
    assert res.exit_code == 0, res.output
    assert "tuned knn on cifar10_val vs tin_val: k=" in res.output and "tuned energy" in res.output
    assert "tuned msp" not in res.output                   # no grid, nothing to tune
    from gradood.analyze.tuning import tune
    chosen = tune(cache, "cifar10", "cifar10_val", "tin_val", ["knn"])["knn"]
    # a direct check of the rule: the chosen k has the highest validation AUROC
    from gradood import analyze
    from sklearn.metrics import roc_auc_score
    aurocs = {}
    for k in (1, 5, 10):                   # the grid's k that 40 training rows allow
        s_in = analyze.score(cache, "cifar10_val", "knn", fit_on="cifar10_train", k=k)
        s_out = analyze.score(cache, "tin_val", "knn", fit_on="cifar10_train", k=k)
        aurocs[k] = roc_auc_score(np.r_[np.ones(len(s_in)), np.zeros(len(s_out))], np.r_[s_in, s_out])
    assert chosen["auroc"] == pytest.approx(max(aurocs.values()))
    saved = json.loads(open(base / "tuned" / "results.json").read())
    assert f"k={chosen['params']['k']}" in saved["settings"]["knn"]
    # the API twin tunes the same way and gives the same table, cell by cell
    df = analyze.evaluate(cache, id="cifar10", scores="knn,energy,msp", convention="openood", tune_on="tin_val")
    df = df[df.setting == "ood"]                # the standard rows (the folder's csid set adds FS-OOD ones)
    assert set(df["ood"]) == set(saved["ood"]) | {"nearood", "farood", "Average"}
    for row in df.to_dict("records"):
        for metric, column in (("FPR95", "FPR95"), ("AUROC", "AUROC"), ("AUPR-In", "AUPR_IN")):
            assert row[column] == saved["results"][row["score"]][row["ood"]][metric], (row["score"], row["ood"])


def test_full_spectrum_counts_csid_sets_as_id(openood):
    """FS-OOD as OpenOOD's eval_ood(fsood=True): the ID side is the ID test rows followed by
    the covariate-shifted ID set's; metrics against a direct scikit-learn computation on
    those rows, accuracy per set against the list's labels, the API equal to the CLI."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from gradood import analyze
    base, root, _, _, cache = openood
    results, scores = str(base / "fs"), str(base / "fs_scores")
    res = CliRunner().invoke(cli, ["analyze", "--benchmark", "openood_cifar10", "--cache-dir", cache, "--score",
                                   "msp,energy", "--metrics", "openood", "--csid", "cifar10c", "--ci", "95",
                                   "--compare", "msp,energy", "--results", results, "--scores-out", scores])
    assert res.exit_code == 0, res.output
    assert "Full-spectrum OOD (FS-OOD" in res.output and "cifar10+csid (36 images)" in res.output
    saved = json.loads(open(os.path.join(results, "results.json")).read())
    assert saved["csid"] == ["cifar10c"] and "cifar10c" not in saved["ood"] and saved["fsood"]["id"] == "cifar10+csid"

    def column(score, d):
        return np.array([float(r["score"]) for r in csv.DictReader(open(os.path.join(scores, score, f"{d}.csv")))])
    for score in ("msp", "energy"):
        known = np.concatenate([column(score, "cifar10"), column(score, "cifar10c")])
        for d in saved["ood"]:
            novel = column(score, d)
            is_ood = np.r_[np.zeros(len(known)), np.ones(len(novel))]
            conf = np.r_[known, novel]
            fpr, tpr, _ = roc_curve(is_ood, -conf)
            cell = saved["fsood"]["results"][score][d]
            assert cell["AUROC"] == pytest.approx(roc_auc_score(is_ood, -conf), abs=1e-12)
            assert cell["FPR95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
            standard = roc_auc_score(np.r_[np.zeros(24), np.ones(len(novel))], -np.r_[column(score, "cifar10"), novel])
            assert saved["results"][score][d]["AUROC"] == pytest.approx(standard, abs=1e-12)
        assert set(saved["fsood"]["intervals"][score]) >= set(saved["ood"])
    assert set(saved["fsood"]["comparisons"]["msp,energy"]) >= set(saved["ood"])
    # accuracy per set, and over the ID test and csid rows together (OpenOOD's ACC of --fsood)
    hits = {}
    for d, listing in (("cifar10", "test_cifar10.txt"), ("cifar10c", "test_cifar10c.txt")):
        labels = [int(line.split()[-1]) for line in open(os.path.join(root, "benchmark_imglist/cifar10", listing))]
        with CacheReader(os.path.join(cache, f"{d}.h5")) as r:
            pred = r.read_all("logits").argmax(axis=1)
        hits[d] = (int((pred == np.array(labels)).sum()), len(labels))
        assert saved["accuracy"][d] == pytest.approx(hits[d][0] / hits[d][1])
    assert saved["fsood"]["id_accuracy"] == pytest.approx(sum(h[0] for h in hits.values()) / 36)
    rows = list(csv.reader(open(os.path.join(results, "fsood", "ood", "msp.csv"))))
    assert rows[1][-1] == f"{100 * saved['fsood']['id_accuracy']:.2f}"
    assert os.path.exists(os.path.join(results, "fsood", "summary.csv"))
    # the Python door gives the same cells, and the preset's csid set is the default
    frame = analyze.evaluate(cache, "cifar10", ["msp", "energy"], convention="openood", csid=["cifar10c"])
    default = analyze.evaluate(cache, "cifar10", ["msp", "energy"], convention="openood")
    assert frame.equals(default)
    for setting, block in (("ood", saved["results"]), ("fsood", saved["fsood"]["results"])):
        part = frame[frame.setting == setting]
        assert len(part) == sum(len(v) for v in block.values())
        for _, row in part.iterrows():
            assert row.AUROC == block[row.score][row.ood]["AUROC"] and row.FPR95 == block[row.score][row.ood]["FPR95"]
    res = CliRunner().invoke(cli, ["analyze", "--benchmark", "openood_cifar10", "--cache-dir", cache, "--score",
                                   "msp", "--ood", "cifar10c", "--results", str(base / "wrong")])
    assert res.exit_code == 2 and "cifar10c is a covariate-shifted ID set" in res.output and "--csid" in res.output


def test_a_full_spectrum_sweep_ranks_what_analyze_reports(openood):
    base, _, _, _, cache = openood
    res = CliRunner().invoke(cli, ["sweep", "--benchmark", "openood_cifar10", "--cache-dir", cache, "--csid",
                                   "cifar10c", "--grid", "energy:temperature=1,10", "--workers", "1",
                                   "--results", str(base / "fs_sweep")])
    assert res.exit_code == 0, res.output
    sweep = json.loads(open(base / "fs_sweep" / "sweep.json").read())
    assert sweep["csid"] == ["cifar10c"] and "cifar10c" not in sweep["reported"]
    res = CliRunner().invoke(cli, ["analyze", "--benchmark", "openood_cifar10", "--cache-dir", cache, "--score",
                                   "energy", "--results", str(base / "fs_energy")])
    assert res.exit_code == 0, res.output
    saved = json.loads(open(base / "fs_energy" / "results.json").read())
    row = [r for r in sweep["rows"] if r["score"] == "energy" and r["params"].get("temperature", 1) == 1][0]
    for d in sweep["reported"]:
        assert row["per_set"][d]["AUROC"] == saved["fsood"]["results"]["energy"][d]["AUROC"]
    assert any(row["per_set"][d]["AUROC"] != saved["results"]["energy"][d]["AUROC"] for d in sweep["reported"])


def test_extract_all_reports_a_missing_csid_set_and_goes_on(openood):
    base, root, ckpt, _, _ = openood
    partial = base / "root_without_csid"
    shutil.copytree(root, partial, symlinks=True)
    os.remove(partial / "benchmark_imglist" / "cifar10" / "test_cifar10c.txt")
    res = CliRunner().invoke(cli, ["extract", "--benchmark", "openood_cifar10", "--data-root", str(partial), "--arch",
                                   "resnet18", "--checkpoint", ckpt, "--preprocess", "demo", "--dataset", "all",
                                   "--cache-dir", str(base / "no_csid"), "--quiet", "--score", "msp", "--limit", "4"])
    assert res.exit_code == 0, res.output
    assert "note: cifar10c, a covariate-shifted ID set" in res.output and "test_cifar10c.txt not found" in res.output
    assert "download" in res.output and not os.path.exists(base / "no_csid" / "cifar10c.h5")
    assert os.path.exists(base / "no_csid" / "cifar10.h5") and os.path.exists(base / "no_csid" / "tin.h5")
    res = CliRunner().invoke(cli, ["extract", "--benchmark", "openood_cifar10", "--data-root", str(partial), "--arch",
                                   "resnet18", "--checkpoint", ckpt, "--preprocess", "demo", "--dataset", "cifar10c",
                                   "--cache-dir", str(base / "no_csid"), "--quiet", "--score", "msp", "--limit", "4"])
    assert res.exit_code == 2 and "test_cifar10c.txt not found" in res.output    # named explicitly: an error
