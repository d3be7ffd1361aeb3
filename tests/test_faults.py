"""What a new user runs into: bad input, faults, CLI misuse. Each test reproduces one fault
and checks the one-line message (or the right behaviour) the user now gets."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gradood.extract.models import build_model
from bench.helpers import randomize_norms, run_cli as run
from gradood.pipeline import cli
from gradood.store.reader import CacheReader
from gradood.store.writer import CacheLock, list_parts, parts_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def setup(tmp_path_factory, demo_files):
    base = tmp_path_factory.mktemp("faults")
    data, ckpt = demo_files
    cache = str(base / "cache")
    common = ["--benchmark", "demo", "--data-root", data, "--checkpoint", ckpt, "--cache-dir", cache,
              "--batch-size", "8", "--quiet"]
    res = CliRunner().invoke(cli, ["extract", *common, "--limit", "12", "--dataset", "digits",
                                   "--dataset", "noise", "--dataset", "textures"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["extract", *common, "--split", "train", "--dataset", "digits",
                                   "--limit", "100", "--balanced"])
    assert res.exit_code == 0, res.output
    return base, data, ckpt, cache, common


# ------------------------------------------------------------------ 1. no fork after OpenMP
def test_sweep_after_an_analysis_in_the_same_process_finishes(setup):
    """KNN (scikit-learn, OpenMP) runs first, then the sweep's worker pool; forked workers
    could deadlock in OpenMP's barrier, forkserver workers do not."""
    base, _, _, cache, _ = setup
    code = (f"from click.testing import CliRunner\nfrom gradood.pipeline import cli\n"
            f"r = CliRunner().invoke(cli, ['analyze', '--cache-dir', {cache!r}, '--id', 'digits', "
            f"'--score', 'knn', '--results', {str(base / 'r1')!r}])\nassert r.exit_code == 0, r.output\n"
            f"r = CliRunner().invoke(cli, ['sweep', '--cache-dir', {cache!r}, '--id', 'digits', '--grid', "
            f"'knn:k=1,5', '--workers', '2', '--results', {str(base / 's1')!r}])\nassert r.exit_code == 0, r.output\n"
            "print('finished')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0 and "finished" in p.stdout, p.stderr


# ------------------------------------------------------------------ 2. existing caches
def test_existing_cache_is_skipped_only_when_equal(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    code, out = run(["extract", *common, "--limit", "12", "--dataset", "noise"])
    assert code == 0 and "up to date" in out
    code, out = run(["extract", *common, "--dataset", f"noise={os.path.join(data, 'shapes')}", "--limit", "12"])
    assert code == 2 and "cannot serve" in out and "dataset_root" in out and "--overwrite" in out
    code, out = run(["extract", *common, "--dataset", f"dup={os.path.join(data, 'noise')}",
                     "--dataset", f"dup={os.path.join(data, 'shapes')}"])
    assert code == 2 and "two different sources for 'dup'" in out
    other = str(tmp_path / "m2.pt")
    torch.manual_seed(1)
    torch.save(randomize_norms(build_model("resnet18", 10), seed=1).state_dict(), other)
    args = [*common, "--limit", "12", "--dataset", "noise", "--checkpoint", other]
    code, out = run(["extract", *args])
    assert code == 2 and "another model" in out and "model.weights" in out
    target = os.path.join(cache, "noise.h5")
    with h5py.File(target, "r+") as f:        # an interrupted assembly's file
        f.attrs["complete"] = False
    code, out = run(["extract", *common, "--limit", "12", "--dataset", "noise"])
    assert code == 2 and "not marked complete" in out and "--overwrite" in out
    code, out = run(["extract", *common, "--limit", "12", "--dataset", "noise", "--overwrite"])
    assert code == 0 and "removed" in out
    with CacheReader(target) as r:
        assert r.attrs["complete"] is True


# ------------------------------------------------------------------ 3. caches of different plans
def test_new_set_with_another_plan_joins_the_analysis(setup):
    """The README's path after the demo: a set extracted with other scores is compared
    only on what each score reads."""
    base, data, ckpt, cache, common = setup
    code, out = run(["extract", *common, "--limit", "12", "--dataset", "shapes", "--score", "msp,knn"])
    assert code == 0, out
    code, out = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "msp", "--score", "knn",
                     "--results", str(base / "r3")])
    assert code == 0 and "shapes FPR95/AUROC" in out, out
    code, out = run(["analyze", "--cache-dir", cache, "--id", "digits", "--results", str(base / "r3b")])
    assert code == 0, out
    assert "note: gaia_z left out: shapes:" in out and "MSP" in out
    code, out = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "gaia_z",
                     "--results", str(base / "r3c")])
    assert code == 2 and "shapes" in out and "--score gaia_z" in out
    os.remove(os.path.join(cache, "shapes.h5"))


def test_training_cache_of_other_extraction_fits_unless_what_is_read_differs(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    with CacheReader(os.path.join(cache, "digits_train.h5")) as t, CacheReader(os.path.join(cache, "digits.h5")) as r:
        assert t.attrs["plan"] != r.attrs["plan"] and t.attrs["objectives"] == []
    # (the covariance fits, ViM and Mahalanobis, on a training cache of another plan: the
    # docs test's `analyze --score all` on the README's caches, 600 training rows)
    code, out = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "knn,react,nac",
                     "--results", str(base / "r4")])
    assert code == 0, out
    odd = str(tmp_path / "odd")
    os.makedirs(odd)
    for name in ("digits.h5", "noise.h5"):
        os.symlink(os.path.join(cache, name), os.path.join(odd, name))
    code, out = run(["extract", "--benchmark", "demo", "--data-root", data, "--checkpoint", ckpt, "--cache-dir", odd,
                     "--split", "train", "--dataset", "digits", "--limit", "10", "--quiet", "--preprocess", "cifar10"])
    assert code == 0, out
    code, out = run(["analyze", "--cache-dir", odd, "--id", "digits", "--score", "knn", "--results", str(tmp_path / "r")])
    assert code == 2 and "differ in preprocess" in out


# ------------------------------------------------------------------ 4. fitting caches are not OOD sets
def test_fit_on_cache_is_not_an_ood_set(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    os.link(os.path.join(cache, "digits_train.h5"), os.path.join(cache, "train1000.h5"))
    try:
        code, out = run(["analyze", "--cache-dir", cache, "--id", "digits", "--fit-on", "train1000",
                         "--score", "knn,msp", "--results", str(tmp_path / "r")])
        assert code == 0, out
        assert "train1000 FPR95" not in out and "Fitted on: train1000 (not OOD sets)" in out
        assert "far-OOD: textures (12 images), noise (12 images)" in out
        res = json.loads((tmp_path / "r" / "results.json").read_text())
        assert res["ood"] == ["noise", "textures"] and "train1000" not in res["results"]["knn"]
    finally:
        os.remove(os.path.join(cache, "train1000.h5"))


# ------------------------------------------------------------------ 5. --split train with a folder, dry-run limit
def test_split_train_with_a_folder_and_dry_run_limit(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    out_dir = str(tmp_path / "c")
    code, out = run(["extract", "--arch", "resnet18", "--num-classes", "10", "--preprocess", "demo",
                     "--checkpoint", ckpt, "--dataset", f"mine={os.path.join(data, 'digits', 'train')}",
                     "--split", "train", "--limit", "10", "--cache-dir", out_dir, "--quiet"])
    assert code == 0 and os.path.exists(os.path.join(out_dir, "mine_train.h5")), out
    with CacheReader(os.path.join(out_dir, "mine_train.h5")) as r:
        assert r.attrs["split"] == "train"
    code, out = run(["extract", *common, "--dataset", "noise", "--dry-run", "--limit", "7"])
    assert code == 0 and "noise: 7 images" in out


# ------------------------------------------------------------------ 6. non-finite input
def test_non_finite_checkpoint_and_parameters_are_refused(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    sd = torch.load(ckpt)
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    sd["linear.bias"][3] = float("inf")
    bad = str(tmp_path / "nan.pt")
    torch.save(sd, bad)
    code, out = run(["extract", *common, "--checkpoint", bad, "--dataset", "noise", "--limit", "4",
                     "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "non-finite" in out and "layer2.0.conv1.weight" in out and "linear.bias" in out
    code, out = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "energy",
                     "--param", "energy.temperature=0", "--results", str(tmp_path / "r")])
    assert code == 2 and "energy" in out and "temperature must be > 0" in out and "digits.h5" in out


# ------------------------------------------------------------------ 7. one-line errors
@pytest.mark.parametrize("content, expected", [
    (b"this is a text file, not weights\n", "not a readable PyTorch checkpoint"),
    (b"", "is empty"),
])
def test_unreadable_checkpoints(setup, tmp_path, content, expected):
    base, data, ckpt, cache, common = setup
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    code, out = run(["extract", *common, "--checkpoint", str(path), "--dataset", "noise", "--limit", "2",
                     "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and expected in out and "Traceback" not in out


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_with_code_is_refused_in_one_line(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    path = str(tmp_path / "code.pt")
    torch.save({"state_dict": torch.load(ckpt), "extra": Payload()}, path)
    code, out = run(["extract", *common, "--checkpoint", path, "--dataset", "noise", "--limit", "2",
                     "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "Python objects besides tensors" in out and "code ran" not in out


@pytest.mark.parametrize("args, expected", [
    (["--param", "msp.temperature=5"], "msp has no parameter 'temperature'"),
    (["--param", "knn.kk=5"], "knn has no parameter 'kk'"),
    (["--param", "knn.k=abc"], "expected an integer"),
    (["--score", "knn", "--param", "energy.temperature=2"], "energy is not among the requested scores"),
    (["--score", "odin", "--param", "odin.temperature=1"], "no recorded ODIN pass with temperature=1"),
    (["--ood", "digits"], "that is the ID set"),
])
def test_bad_analysis_options(setup, tmp_path, args, expected):
    base, data, ckpt, cache, common = setup
    code, out = run(["analyze", "--cache-dir", cache, "--id", "digits", "--results", str(tmp_path / "r"), *args])
    assert code == 2 and expected in out and "Traceback" not in out, out


@pytest.mark.parametrize("args, expected", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--limit", "0"], "--limit"),
    (["--device", "gpu"], "use auto, cpu, cuda or cuda:N"),
    (["--store", "layer9=raw"], "'layer9' is not a hooked layer"),
    (["--score", "knn", "--param", "gaia_z.spatial=l2"], "gaia_z is not among the requested scores"),
    (["--hook-set", "nca=layer4"], "'nca' is not a hook set; the sets are bn, before_head"),
])
def test_bad_extraction_options(setup, tmp_path, args, expected):
    base, data, ckpt, cache, common = setup
    out_dir = tmp_path / "c"
    code, out = run(["extract", *common, "--dataset", "noise", "--limit", "4", "--cache-dir", str(out_dir), *args])
    assert code == 2 and expected in out and "Traceback" not in out, out
    assert not list(out_dir.glob("*.parts")) if out_dir.exists() else True


def test_balanced_without_limit_is_refused(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    code, out = run(["extract", *common, "--split", "train", "--dataset", "digits", "--balanced",
                     "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "--balanced picks a class-balanced subset of --limit images" in out, out
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_unknown_sweep_grid_key_is_refused(setup):
    base, data, ckpt, cache, common = setup
    code, out = run(["sweep", "--cache-dir", cache, "--id", "digits", "--grid", "knn:kk=1,2"])
    assert code == 2 and "knn has no parameter 'kk'" in out


def test_results_on_a_file_or_read_only_folder(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, out = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "msp", "--results", str(a_file)])
    assert code == 2 and "--results" in out and "is a file" in out
    # a folder nobody can create, root included (chmod does not stop root)
    code, out = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "msp",
                     "--results", str(tmp_path / "r"), "--scores-out", "/proc/gradood-scores"])
    assert code == 2 and "--scores-out /proc/gradood-scores: cannot write there" in out


def test_non_utf8_file_name_is_extracted(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    folder = tmp_path / "set" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 200, 30)).save(folder / "ok.png")
    weird = os.path.join(os.fsencode(str(folder)), b"caf\xe9.png")
    Image.new("RGB", (32, 32), (200, 10, 30)).save(weird.decode("utf-8", "surrogateescape"), format="PNG")
    code, out = run(["extract", "--arch", "resnet18", "--num-classes", "10", "--preprocess", "demo",
                     "--checkpoint", ckpt, "--dataset", f"odd={tmp_path / 'set'}", "--cache-dir",
                     str(tmp_path / "c"), "--score", "msp", "--quiet"])
    assert code == 0, out
    with CacheReader(str(tmp_path / "c" / "odd.h5")) as r:
        paths = list(r.read_all("paths"))
    assert any(p.endswith("caf\\xe9.png") for p in paths)


# ------------------------------------------------------------------ 8. disk full during assembly
def test_disk_full_during_assembly_is_one_message_and_no_crash(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    code = (
        "import errno, sys\nimport gradood.store.writer as W\nfrom click.testing import CliRunner\nfrom gradood.pipeline import cli\n"
        "real = W._create_rows_dataset\ncalls = []\n"
        "def failing(f, path, *a):\n"
        "    calls.append(path)\n"
        "    if len(calls) > 4:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(f, path, *a)\n"
        "W._create_rows_dataset = failing\n"
        f"args = ['extract', {', '.join(repr(a) for a in common)}, '--dataset', 'noise', '--limit', '4', "
        f"'--cache-dir', {str(tmp_path / 'c')!r}]\n"
        "r = CliRunner().invoke(cli, args)\nprint('EXIT', r.exit_code)\nprint(r.output)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr[-2000:]            # no segmentation fault (rc 139)
    assert "EXIT 2" in p.stdout and "could not assemble" in p.stdout and "No space left" in p.stdout
    assert "__dealloc__" not in p.stderr and "Traceback" not in p.stderr
    target = str(tmp_path / "c" / "noise.h5")
    assert not os.path.exists(target) and list_parts(parts_dir(target))
    code2, out = run(["extract", *common, "--dataset", "noise", "--limit", "4", "--cache-dir", str(tmp_path / "c")])
    assert code2 == 0 and os.path.exists(target)


# ------------------------------------------------------------------ 9. lock
def test_second_extraction_into_a_locked_cache_names_the_holder(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    target = str(tmp_path / "c" / "noise.h5")
    lock = CacheLock(target).acquire()
    try:
        p = subprocess.run([sys.executable, os.path.join(ROOT, "pipeline.py"), "extract", *common, "--dataset",
                            "noise", "--limit", "4", "--cache-dir", str(tmp_path / "c")],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    finally:
        lock.release()
    assert p.returncode == 2 and f"pid {os.getpid()}" in p.stderr and "another extraction" in p.stderr
    assert not os.path.exists(target)


# ------------------------------------------------------------------ 10. Ctrl-C
def test_ctrl_c_keeps_the_parts_and_says_how_to_resume(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    target = str(tmp_path / "c" / "noise.h5")
    # batch size 1: the run lasts long enough that the interrupt lands mid-extraction, not
    # after the last batch (with 4 the small set could finish between poll and signal)
    args = [sys.executable, os.path.join(ROOT, "pipeline.py"), "extract", *common, "--dataset", "noise",
            "--batch-size", "1", "--cache-dir", str(tmp_path / "c")]
    # a shell's background job (`make test &`) starts with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: the child gets the default disposition back, as a
    # terminal's foreground job has it
    p = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(list_parts(parts_dir(target))) < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted" in err and "rerun the same command to resume" in err
    assert list_parts(parts_dir(target)) and not os.path.exists(target)


def test_interrupt_during_assembly_completes_the_file_then_stops(setup, tmp_path, monkeypatch):
    import gradood.store.writer as W
    from test_store import make_writer, rows
    path = str(tmp_path / "toy.h5")
    w = make_writer(path)
    w.start()
    w.write_rows(0, rows(0, 10))
    real = W.CacheWriter._write_final

    def interrupted(self, tmp, parts):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, tmp, parts)
    monkeypatch.setattr(W.CacheWriter, "_write_final", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.assemble()
    with CacheReader(path) as r:
        assert r.attrs["complete"] is True and r.n_samples == 10


# ------------------------------------------------------------------ 11. skipped images
def test_skipped_images_are_visible(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    folder = tmp_path / "mix" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 10, 10)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out_dir = str(tmp_path / "c")
    code, out = run(["extract", "--arch", "resnet18", "--num-classes", "10", "--preprocess", "demo",
                     "--checkpoint", ckpt, "--dataset", f"mix={tmp_path / 'mix'}", "--cache-dir", out_dir,
                     "--score", "msp", "--skip-bad", "--quiet"])
    assert code == 0 and "mix: 4 images (1 skipped: unreadable)" in out
    code, out = run(["inspect", os.path.join(out_dir, "mix.h5")])
    assert "1 skipped" in out
    for name in ("digits", "noise"):
        os.symlink(os.path.join(cache, f"{name}.h5"), os.path.join(out_dir, f"{name}.h5"))
    code, out = run(["analyze", "--cache-dir", out_dir, "--id", "digits", "--score", "msp",
                     "--results", str(tmp_path / "r"), "--scores-out", str(tmp_path / "s")])
    assert code == 0 and "mix (3 images, 1 skipped)" in out, out
    with open(tmp_path / "s" / "msp" / "mix.csv") as f:
        rows = list(csv.DictReader(f))
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert broken[0]["skipped"] == "1" and broken[0]["score"] == "nan"
    assert all(r["skipped"] == "0" for r in rows if r is not broken[0])


# ------------------------------------------------------------------ 12. 16-bit PNG
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from gradood.extract.datasets import load_rgb
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb(str(path)))
    assert rgb.shape == (32, 32, 3)
    assert (rgb == 255).mean() < 0.01
    np.testing.assert_allclose(rgb[..., 0].astype(float), ramp / 257.0, atol=1.0)


# ------------------------------------------------------------------ 13. results folders
def test_second_analysis_rewrites_the_results_folder(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    out = tmp_path / "r"
    code, _ = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "msp,energy", "--results", str(out)])
    assert code == 0 and (out / "energy.md").exists()
    (out / "fitted").mkdir(exist_ok=True)
    code, _ = run(["analyze", "--cache-dir", cache, "--id", "digits", "--score", "msp", "--results", str(out),
                   "--metrics", "gaia"])
    assert code == 0
    assert not (out / "energy.md").exists() and (out / "msp.md").exists() and (out / "fitted").exists()
    assert json.loads((out / "results.json").read_text())["convention"] == "gaia"


# ------------------------------------------------------------------ 14. messages that mislead
def test_empty_folders_say_what_is_missing(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    (tmp_path / "empty").mkdir()
    (tmp_path / "classes" / "a").mkdir(parents=True)
    for folder, expected in (("empty", "has no class sub-folders"), ("classes", "no image files")):
        code, out = run(["extract", "--arch", "resnet18", "--num-classes", "10", "--preprocess", "demo",
                         "--checkpoint", ckpt, "--dataset", f"x={tmp_path / folder}", "--cache-dir",
                         str(tmp_path / "c")])
        assert code == 2 and expected in out and "never downloads" not in out


def test_newer_schema_asks_to_upgrade(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    import shutil
    path = str(tmp_path / "new.h5")
    shutil.copy(os.path.join(cache, "noise.h5"), path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(Exception, match="upgrade gradood"):
        CacheReader(path)


def test_inspect_partial_and_resume_with_another_batch_size(setup, tmp_path, monkeypatch):
    """An extraction stopped after two parts (in this process: the kill -9 of a real one is
    tests/test_kill_resume.py's) is inspected as partial, and resuming it with another
    batch size is refused."""
    import gradood.store.writer as W
    base, data, ckpt, cache, common = setup
    target = str(tmp_path / "c" / "noise.h5")
    real = W.CacheWriter.write_rows

    def stops_after_two(self, start, arrays):
        if len(list_parts(parts_dir(target))) == 2:
            raise KeyboardInterrupt
        return real(self, start, arrays)
    monkeypatch.setattr(W.CacheWriter, "write_rows", stops_after_two)
    code, out = run(["extract", *common, "--dataset", "noise", "--batch-size", "4", "--cache-dir", str(tmp_path / "c")])
    assert code == 130 and len(list_parts(parts_dir(target))) == 2, out
    monkeypatch.setattr(W.CacheWriter, "write_rows", real)
    code, out = run(["inspect", target])
    assert code == 0 and "8 of 400 samples extracted" in out, out
    code, out = run(["extract", *common, "--dataset", "noise", "--batch-size", "8", "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "--batch-size 4" in out


# ------------------------------------------------------------------ 15. CLI consistency
def test_sweep_options_match_analyze(setup, tmp_path):
    base, data, ckpt, cache, common = setup
    code, out = run(["sweep", "--cache-dir", cache, "--id", "digits", "--grid", "knn:k=1", "--rank-by", "AUROC",
                     "--allow-partial", "--workers", "1", "--results", str(tmp_path / "s")])
    assert code == 0, out
    code, out = run(["sweep", "--cache-dir", cache, "--id", "digits", "--ood", "digits"])
    assert code == 2 and "that is the ID set" in out


def test_wide_tables_are_split_to_fit_120_columns():
    from gradood.analyze.tables import plain
    header = ["Method", *[f"set{i} FPR95/AUROC" for i in range(8)], "Avg"]
    rows = [["GAIA-Z", *["12.34 / 56.78"] * 8, "1.00"]]
    text = plain(header, rows)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert text.count("GAIA-Z") >= 2 and "set7" in text and "Avg" in text


def test_layer_chart_shows_each_layers_best_variant_in_network_order(tmp_path):
    pytest.importorskip("matplotlib")
    from gradood.analyze import plots
    drawn = {}

    class Axes:
        def bar(self, x, heights, **kw):
            drawn["heights"] = list(heights)

        def set_xticklabels(self, labels, **kw):
            drawn["labels"] = list(labels)

        def __getattr__(self, name):
            return lambda *a, **k: None
    real = plots._pyplot()
    monkey = type("P", (), {"subplots": staticmethod(lambda **k: (None, Axes())), "close": real.close})
    rows = [{"score": "nac", "params": {"layers": ["layer4"], "M": m}, "average": {"AUROC": a}}
            for m, a in ((10, 0.5), (50, 0.99))]
    rows += [{"score": "nac", "params": {"layers": ["avgpool"]}, "average": {"AUROC": 0.7}}]
    from gradood.analyze.results import SweepResult
    sweep = SweepResult(rows=rows, errors=[], reported=[], select_on=None, metric="AUROC", selected={},
                        seconds=0.0, n_variants=len(rows), workers=1, id="digits",
                        layer_order={"nac": ["avgpool", "layer1", "layer4"]})
    orig_pyplot, orig_save = plots._pyplot, plots._save
    plots._pyplot, plots._save = (lambda: monkey), (lambda plt, fig, out, name: name)
    try:
        plots.layer_contribution(sweep, str(tmp_path))
    finally:
        plots._pyplot, plots._save = orig_pyplot, orig_save
    assert drawn["labels"] == ["avgpool", "layer4"] and drawn["heights"] == [70.0, 99.0]
