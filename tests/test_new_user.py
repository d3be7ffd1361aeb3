"""What a new user hits right after the demo: caches that already serve a request, results
kept across runs, fits on the test images, degenerate fits, SIGTERM, the Mahalanobis
ensemble's cost, hand-edited caches, interrupts inside plugins."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradood.extract import ExtractConfig
from gradood.extract.runner import ExtractionPlan
from gradood.extract.models import build_model
from bench.helpers import compute_score, extract_tensor, fit_score, randomize_norms
from gradood.pipeline import cli
from gradood.store.reader import CacheReader
from gradood.store.schema import CacheError, stat_path
from gradood.store.writer import list_parts, parts_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_files):
    base = tmp_path_factory.mktemp("newuser")
    data, ckpt = demo_files
    return base, data, ckpt


def small_folder(folder, dest, n):
    """An ImageFolder at ``dest`` holding copies of the first ``n`` images of ``folder`` (class folders kept)."""
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs)[:n]
    for f in files:
        target = os.path.join(dest, os.path.relpath(f, folder))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(f, target)
    return str(dest)


def run(args, ok=True):
    res = CliRunner().invoke(cli, args)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def extract(data, ckpt, cache, *more):
    return ["extract", "--benchmark", "demo", "--data-root", data, "--checkpoint", ckpt, "--cache-dir", cache,
            "--quiet", "--batch-size", "8", *more]


def test_a_cache_that_serves_the_request_is_reused(workspace):
    base, data, ckpt = workspace
    cache = str(base / "reuse")
    run(extract(data, ckpt, cache, "--dataset", "noise", "--limit", "16", "--score", "gaia_z,msp,knn"))
    res = run(extract(data, ckpt, cache, "--dataset", "noise", "--limit", "16", "--score", "msp,knn"))
    assert "already serves msp, knn" in res.output and "skipped" in res.output
    res = run(extract(data, ckpt, cache, "--dataset", "noise", "--limit", "16", "--score", "gaia_a"), ok=False)
    assert res.exit_code == 2 and "cannot serve gaia_a: it lacks" in res.output and "OVERWRITE=1" in res.output
    res = run(extract(data, ckpt, cache, "--dataset", "noise", "--limit", "12", "--score", "msp"), ok=False)
    assert res.exit_code == 2 and "other rows of the set" in res.output and "n_samples: 16 in the cache, 12 now" in res.output
    make = subprocess.run(["make", "-n", "extract", "OVERWRITE=1"], cwd=ROOT, capture_output=True, text=True)
    assert "--overwrite" in make.stdout


def test_results_of_earlier_runs_are_kept(workspace):
    base, data, ckpt = workspace
    cache, out = str(base / "res"), str(base / "results")
    run(extract(data, ckpt, cache, "--dataset", "digits", "--dataset", "noise", "--limit", "16",
                "--score", "msp,energy,maxlogit"))
    run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "msp,energy,maxlogit", "--results", out])
    assert os.path.exists(os.path.join(out, "energy.csv"))
    res = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "msp", "--results", out])
    assert "files were moved to" in res.output
    previous = os.path.join(out, "previous")
    (stamp,) = os.listdir(previous)
    for name in ("energy.csv", "maxlogit.md", "summary.csv", "results.json"):
        assert os.path.exists(os.path.join(previous, stamp, name)), name
    assert not os.path.exists(os.path.join(out, "energy.csv"))
    assert os.path.exists(os.path.join(out, "msp.csv"))


def test_fitting_on_the_test_images_is_refused(workspace):
    base, data, ckpt = workspace
    cache = str(base / "overlap")
    digits = small_folder(os.path.join(data, "digits", "test"), base / "few_digits", 12)
    common = ["extract", "--arch", "resnet18", "--checkpoint", ckpt, "--num-classes", "10", "--preprocess",
              "demo", "--cache-dir", cache, "--quiet", "--score", "knn,msp"]
    run(common + ["--dataset", f"mine={digits}", "--limit", "12"])
    run(common + ["--dataset", f"far={os.path.join(data, 'noise')}", "--limit", "12"])
    res = run(common + ["--dataset", f"mine={digits}", "--split", "train", "--limit", "100000"])
    assert "--limit 100000, but the set has" in res.output and "taking all" in res.output
    knn = ["--score", "knn", "--param", "knn.k=5"]          # k within the 12 training rows
    res = run(["analyze", "--cache-dir", cache, "--id", "mine", *knn, "--results", str(base / "o1")], ok=False)
    assert res.exit_code == 2 and "shares 12 image(s) with the evaluated cache" in res.output
    assert "--allow-overlap" in res.output
    run(["analyze", "--cache-dir", cache, "--id", "mine", *knn, "--results", str(base / "o2"), "--allow-overlap"])


def test_degenerate_fits_are_refused(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    x = torch.randn(60, 3, 32, 32)
    path = extract_tensor(model, "resnet18", x, str(tmp_path / "train.h5"), ["msp"], batch_size=30,
                          labels=torch.arange(60) % 10, name="train")
    with CacheReader(path) as r:
        for score, text in (("vim", "needs more rows than feature dimensions (at least 513"),
                            ("mahalanobis", "rank at most 50, fewer than the 512 feature dimensions"),
                            ("rmds", "fit on at least 522 rows")):
            with pytest.raises(Exception, match=re.escape(text)) as err:
                fit_score(r, score)
            assert score in str(err.value) and path in str(err.value)


def test_sigterm_keeps_parts_removes_the_lock_and_resumes(workspace):
    base, data, ckpt = workspace
    cache = str(base / "term")
    cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), *extract(data, ckpt, cache, "--dataset", "shapes",
                                                                       "--limit", "24", "--batch-size", "2",
                                                                       "--score", "gaia_z,gaia_a")]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    target = os.path.join(cache, "shapes.h5")
    deadline = time.time() + 120
    while len(list_parts(parts_dir(target))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "rerun the same command to resume" in err
    assert not os.path.exists(target + ".lock")
    assert 0 < len(list_parts(parts_dir(target))) < 12
    run(cmd[2:])                     # the same command, resumed in this process
    with CacheReader(target) as r:
        assert r.n_samples == 24


def test_mahalanobis_ensemble_cost_is_shown_before_it_starts():
    model = randomize_norms(build_model("resnet18", 10))
    recipe = {"layers": ["layer1", "layer2", "layer3", "layer4"], "magnitudes": [0.0, 0.01, 0.005, 0.002, 0.0014,
                                                                               0.001, 0.0005],
              "adversarial": True, "adv_noise": 0.05}
    config = ExtractConfig(arch="resnet18", passes=("mahalanobis",), maha={"gaussians": None, "recipe": recipe},
                           device="cpu", progress=False)
    plan = ExtractionPlan(model, config, (3, 32, 32), torch.device("cpu"))
    text = "\n".join(plan.describe(100))
    assert "forward-pass equivalents per image" in text
    assert plan.maha_cost() == pytest.approx(2 * (1 + 2.5 * 8) + 3)


def test_impossible_values_in_an_edited_cache_are_refused(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    path = extract_tensor(model, "resnet18", torch.randn(6, 3, 32, 32), str(tmp_path / "c.h5"), ["gaia_z", "msp"])
    with CacheReader(path) as r:
        layer = r.attrs["hook_sets"]["bn"][0]
        area = r.attrs["layer_shapes"][layer][1] * r.attrs["layer_shapes"][layer][2]
        before = compute_score(r, "gaia_z")
    assert np.all(np.isfinite(before))
    with h5py.File(path, "r+") as f:
        f[stat_path(layer, "max_logit", "nonzero")][2, 0] = area + 1
    with CacheReader(path) as r, pytest.raises(CacheError, match=r"counts outside \[0, 1024\].*row 2"):
        compute_score(r, "gaia_z")
    with h5py.File(path, "r+") as f:
        f[stat_path(layer, "max_logit", "nonzero")][2, 0] = -3
        f["logits"][4, 1] = np.nan
    with CacheReader(path) as r:
        with pytest.raises(CacheError, match="counts outside"):
            compute_score(r, "gaia_z")
        with pytest.raises(CacheError, match=r"logits holds NaN or infinite values \(first at row 4"):
            compute_score(r, "msp")


def test_keyboard_interrupt_inside_a_plugin_says_where(workspace, tmp_path):
    base, data, ckpt = workspace
    cache = str(base / "plug")
    run(extract(data, ckpt, cache, "--dataset", "digits", "--dataset", "noise", "--limit", "8", "--score", "msp"))
    plugin = tmp_path / "stops.py"
    plugin.write_text("from gradood.analyze import register_score\n\n\n"
                      "@register_score('stops')\n"
                      "def stops(data):\n"
                      "    raise KeyboardInterrupt\n")
    out = str(tmp_path / "r")
    from gradood.analyze.registry import SCORES
    try:
        res = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "stops", "--plugin", str(plugin),
                   "--results", out], ok=False)
    finally:
        SCORES.pop("stops", None)        # later tests' --score all must not meet it
    assert res.exit_code == 130
    assert "interrupted while stops scored rows 0-8" in res.output and "no table" in res.output
    assert not os.path.exists(os.path.join(out, "summary.csv"))


def test_tables_and_figures_a_paper_can_use(workspace, capsys):
    import csv
    base, data, ckpt = workspace
    cache, out = str(base / "paper"), str(base / "paper_results")
    run(extract(data, ckpt, cache, "--dataset", "digits", "--dataset", "noise", "--dataset", "shapes",
                "--limit", "16", "--score", "msp,energy,maxlogit"))
    run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "msp,energy,maxlogit", "--results", out,
         "--plots"])
    rows = list(csv.reader(open(os.path.join(out, "summary.csv"))))
    assert rows[0][:3] == ["method", "noise FPR95", "noise AUROC"]
    assert all(float(cell) >= 0 for row in rows[1:] for cell in row[1:])      # one number per cell
    plots = os.listdir(os.path.join(out, "plots"))
    assert "compare_noise.png" in plots and "compare_Average.png" in plots
    assert all(p[:-4] + ".pdf" in plots for p in plots if p.endswith(".png"))
    res = run(["sweep", "--cache-dir", cache, "--id", "digits", "--grid", "energy:temperature=1,10",
               "--results", str(base / "paper_sweep"), "--no-plots"])
    assert "on the test sets themselves" in open(base / "paper_sweep" / "sweep.md").read()
    from gradood.analyze.evaluator import run_evaluation
    capsys.readouterr()
    run_evaluation(cache, "digits", ["noise"], ["msp"], progress=True)
    assert "analyze" in capsys.readouterr().err
