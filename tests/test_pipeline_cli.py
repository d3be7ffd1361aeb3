"""End to end on a slice of the demo benchmark, the torch-free analysis, user-facing errors."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradood.extract.checkpoint import CheckpointMismatch, load_checkpoint
from gradood.extract.models import build_model
from gradood.pipeline import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def demo_slice(tmp_path_factory, demo_files):
    base = tmp_path_factory.mktemp("demo")
    data, ckpt = demo_files
    cache = str(base / "cache")
    res = CliRunner().invoke(cli, ["extract", "--benchmark", "demo", "--data-root", data,
                                   "--checkpoint", ckpt, "--cache-dir", cache, "--limit", "12",
                                   "--dataset", "digits", "--dataset", "noise", "--dataset", "shapes",
                                   "--batch-size", "5", "--quiet"])
    assert res.exit_code == 0, res.output
    return base, data, ckpt, cache


def run_without_torch(args, cwd):
    """Run pipeline.py in a subprocess in which importing torch raises ImportError."""
    code = ("import sys, runpy\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
            "            raise ImportError('torch import blocked: ' + name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "sys.argv = ['pipeline.py'] + sys.argv[1:]\n"
            f"runpy.run_path({os.path.join(ROOT, 'pipeline.py')!r}, run_name='__main__')\n"
            "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_analyze_runs_without_torch(demo_slice):
    base, _, _, cache = demo_slice
    out = str(base / "scores")
    p = run_without_torch(["analyze", "--benchmark", "demo", "--cache-dir", cache, "--score", "all",
                           "--results", str(base / "results"), "--scores-out", out], str(base))
    assert p.returncode == 0, p.stderr
    for title in ("GAIA-A", "GAIA-Z", "GradNorm", "MSP", "MaxLogit", "Energy"):
        assert title in p.stdout
    assert "noise FPR95/AUROC" in p.stdout and "shapes FPR95/AUROC" in p.stdout
    for ext in ("csv", "md"):
        assert os.path.exists(base / "results" / f"gaia_z.{ext}")
    assert os.path.exists(base / "results" / "results.json")
    with open(os.path.join(out, "gaia_a", "noise.csv")) as f:
        table = list(csv.reader(f))
    assert table[0] == ["index", "path", "score", "skipped"] and len(table) == 13
    assert table[1][1].endswith(".png")


def test_inspect_and_dry_run(demo_slice):
    base, data, ckpt, cache = demo_slice
    res = CliRunner().invoke(cli, ["inspect", os.path.join(cache, "digits.h5")])
    assert res.exit_code == 0 and "12 samples" in res.output and "max_logit: nonzero" in res.output
    res = CliRunner().invoke(cli, ["extract", "--benchmark", "demo", "--data-root", data,
                                   "--dataset", "noise", "--dry-run", "--store", "layer4=raw"])
    assert res.exit_code == 0, res.output
    assert "KiB per image" in res.output and "layer4" in res.output and "map" in res.output


@pytest.mark.parametrize("args, expected", [
    (["analyze", "--cache-dir", ".", "--id", "x", "--score", "gaia_q"], "gaia_a, gaia_z"),
    (["extract", "--arch", "resnet99", "--num-classes", "10", "--preprocess", "cifar10",
      "--dataset", "a=b", "--checkpoint", "x"], "resnet18_32x32"),
    (["extract", "--benchmark", "demo", "--dataset", "LSUN", "--dry-run"], "digits, digits_train"),
    (["extract", "--benchmark", "cifar10", "--data-root", "/nonexistent", "--dataset", "LSUN",
      "--dry-run", "--limit", "1", "--hook", "bnx"], "unknown hook 'bnx'"),
    (["extract", "--benchmark", "demo", "--dataset", "digits", "--dry-run", "--policy", "zip"], "zip"),
])
def test_errors_list_valid_choices(args, expected):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    assert expected in res.output


def test_missing_dataset_prints_layout(tmp_path):
    ckpt = str(tmp_path / "m.pt")
    torch.save(build_model("resnet18", 10).state_dict(), ckpt)
    res = CliRunner().invoke(cli, ["extract", "--benchmark", "cifar10", "--data-root", str(tmp_path),
                                   "--dataset", "LSUN", "--checkpoint", ckpt])
    assert res.exit_code == 2
    assert "LSUN/<class folder>/<image files>" in res.output and "never downloads" in res.output
    res = CliRunner().invoke(cli, ["extract", "--benchmark", "cifar10", "--data-root", str(tmp_path),
                                   "--dataset", "cifar10", "--checkpoint", ckpt])
    assert "cifar-10-batches-py" in res.output


def test_checkpoint_formats_and_mismatch(tmp_path):
    model = build_model("resnet18", 10)
    with torch.no_grad():                 # weights an fp16 copy holds exactly
        for p in model.parameters():
            p.copy_(p.half().float())
    sd = model.state_dict()
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    hashes = set()
    for i, obj in enumerate([sd, {"state_dict": sd}, {"model": {f"module.{k}": v for k, v in sd.items()}}, half]):
        path = str(tmp_path / f"c{i}.pt")
        torch.save(obj, path)
        fresh = build_model("resnet18", 10)
        file_sha, weights_sha = load_checkpoint(fresh, path)
        assert len(file_sha) == 64 and len(weights_sha) == 64
        hashes.add(weights_sha)
        assert torch.equal(fresh.linear.weight, model.linear.weight)
    # the same weights in four files: one weights fingerprint (the file hashes differ)
    assert len(hashes) == 1
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(build_model("resnet18", 100), str(tmp_path / "c0.pt"))
    assert "mis-shaped" in str(err.value) and "linear.weight" in str(err.value)
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(build_model("resnet18_32x32", 10), str(tmp_path / "c0.pt"))
    assert "missing" in str(err.value) and "fc.weight" in str(err.value)
    assert "unexpected" in str(err.value) and "linear.weight" in str(err.value)


def test_balanced_training_split(demo_slice):
    base, data, ckpt, _ = demo_slice
    cache = str(base / "train_cache")
    res = CliRunner().invoke(cli, ["extract", "--benchmark", "demo", "--data-root", data,
                                   "--checkpoint", ckpt, "--cache-dir", cache, "--split", "train",
                                   "--dataset", "digits", "--limit", "20", "--balanced",
                                   "--score", "msp", "--quiet"])
    assert res.exit_code == 0, res.output
    from gradood.store.reader import CacheReader
    with CacheReader(os.path.join(cache, "digits_train.h5")) as r:
        labels = r.read_all("labels")
        assert r.attrs["split"] == "train" and r.attrs["objectives"] == []
    assert sorted(np.bincount(labels, minlength=10).tolist()) == [2] * 10


def test_sweep_runs_without_torch_and_selects_on_validation(demo_slice):
    base, data, ckpt, cache = demo_slice
    res = CliRunner().invoke(cli, ["extract", "--benchmark", "demo", "--data-root", data,
                                   "--checkpoint", ckpt, "--cache-dir", cache, "--split", "train",
                                   "--dataset", "digits", "--limit", "20", "--balanced",
                                   "--batch-size", "10", "--quiet"])
    assert res.exit_code == 0, res.output
    out = base / "sweep"
    p = run_without_torch(["sweep", "--benchmark", "demo", "--cache-dir", cache, "--results", str(out),
                           "--grid", "gaia_z:spatial=nonzero,l2;channel=sq_mean,max;layers=all,each",
                           "--grid", "knn:k=1,5", "--select-on", "noise", "--workers", "2",
                           "--no-plots"], str(base))
    assert p.returncode == 0, p.stderr
    text = (out / "sweep.md").read_text()
    assert "GAIA-Z (paper) *" in text and "NAC-UE (paper, CIFAR-10 config) *" in text
    assert "validation set noise" in text and "Selected per score" in text
    import json
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["reported"] == ["shapes"]            # the validation set is not reported
    def single(rows):
        return [r for r in rows if r["score"] == "gaia_z" and len(r["params"].get("layers") or []) == 1]
    # 20 BatchNorm2d layers x 2 channel aggregations; spatial=l2 needs sq_mean, which the
    # default storage policy does not keep: those variants are reported as not servable.
    # On this random model some single layers give every image the same count: those
    # variants are reported as constant, not ranked with AUROC 50
    constant = [r for r in single(sweep["errors"]) if "same value" in r["error"]]
    assert len(single(sweep["rows"])) + len(constant) == 20 * 2 and constant
    unservable = [e for e in sweep["errors"] if e["score"] == "gaia_z" and "same value" not in e["error"]]
    assert len(unservable) == 21 * 2 and all("sq_mean" in e["error"] for e in unservable)
    assert sweep["n_variants"] == len(sweep["rows"]) + len(sweep["errors"])
    ranks = [r["rank_value"] for r in sweep["rows"]]
    assert ranks == sorted(ranks)                      # FPR95 on the validation set, best first
    # the paper variant's numbers equal the analyze command's
    row = next(r for r in sweep["rows"] if r["label"] == "GAIA-Z (paper)")
    p = run_without_torch(["analyze", "--benchmark", "demo", "--cache-dir", cache, "--score", "gaia_z",
                           "--results", str(base / "results_z")], str(base))
    assert p.returncode == 0, p.stderr
    res = json.loads((base / "results_z" / "results.json").read_text())
    assert abs(row["per_set"]["shapes"]["AUROC"] - res["results"]["gaia_z"]["shapes"]["AUROC"]) < 1e-12


def test_unreadable_image_stops_or_is_skipped(tmp_path):
    root = tmp_path / "set" / "a"
    root.mkdir(parents=True)
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 10, 10)).save(root / f"ok{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    ckpt = str(tmp_path / "m.pt")
    torch.save(build_model("resnet18", 10).state_dict(), ckpt)
    args = ["extract", "--arch", "resnet18", "--checkpoint", ckpt, "--num-classes", "10",
            "--preprocess", "demo", "--dataset", f"odd={tmp_path / 'set'}", "--cache-dir",
            str(tmp_path / "c"), "--score", "gaia_z", "--quiet"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "broken.png" in res.output and "--skip-bad" in res.output
    res = CliRunner().invoke(cli, args + ["--skip-bad"])
    assert res.exit_code == 0, res.output
    from gradood.store.reader import CacheReader
    with CacheReader(str(tmp_path / "c" / "odd.h5")) as r:
        skipped = r.read_all("skipped")
        reasons = r.read_all("skip_reasons")
        paths = r.read_all("paths")
        n_skipped = r.attrs["n_skipped"]
    assert skipped.sum() == 1 and paths[skipped][0].endswith("broken.png")
    assert n_skipped == 1
    assert "UnidentifiedImageError" in reasons[skipped][0] and reasons[~skipped].tolist() == ["", "", ""]
