"""No silent wrong number: sweeps and tuning that mix models, labels the head cannot have,
constant scores, dataset names that escape the cache folder, refused runs that leave
debris, plugins reloaded in a notebook."""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gradood.analyze.registry import SCORES, entry, load_plugin
from gradood.extract.models import build_model
from bench.helpers import demo_workspace, randomize_norms, run_cli as run
from gradood.pipeline import cli
from gradood.store.writer import parts_dir


@pytest.fixture(scope="session")
def two_models(tmp_path_factory, demo_files):
    """A cache folder holding caches of two different weights (mine*, far, far_other)."""
    base = tmp_path_factory.mktemp("silent")
    data, ckpt = demo_files
    other = str(base / "other.pt")
    torch.save(randomize_norms(build_model("resnet18", 10), seed=3).state_dict(), other)
    cache = str(base / "cache")
    digits, noise = os.path.join(data, "digits", "test"), os.path.join(data, "noise")

    def ex(checkpoint, *datasets, more=()):
        args = ["extract", "--arch", "resnet18", "--checkpoint", checkpoint, "--num-classes", "10",
                "--preprocess", "demo", "--cache-dir", cache, "--quiet", "--score", "knn,react,msp",
                "--limit", "24", *[a for d in datasets for a in ("--dataset", d)], *more]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
    ex(ckpt, f"mine={digits}", f"mine_val={os.path.join(data, 'shapes')}", f"near={noise}")
    ex(ckpt, f"mine={os.path.join(data, 'digits', 'train')}", more=("--split", "train"))
    ex(other, f"far={noise}", f"far_other={os.path.join(data, 'textures')}")
    return base, data, ckpt, cache


def folder_with_id_cache(cache, tmp_path):
    """A new cache folder holding (a link to) the fixture's ID cache ``mine`` only."""
    folder = tmp_path / "c"
    folder.mkdir()
    os.symlink(os.path.join(cache, "mine.h5"), folder / "mine.h5")
    return folder


def test_sweep_refuses_caches_of_different_weights(two_models):
    base, _, _, cache = two_models
    code, out = run(["sweep", "--cache-dir", cache, "--id", "mine", "--ood", "far", "--grid", "knn:k=1,5",
                     "--results", str(base / "s")])
    assert code == 2 and "the swept caches mix models" in out and "weights" in out


def test_tuning_refuses_another_models_cache(two_models):
    base, _, _, cache = two_models
    code, out = run(["analyze", "--cache-dir", cache, "--id", "mine", "--ood", "near", "--score", "react",
                     "--tune-on", "far_other", "--tune-id", "mine_val", "--results", str(base / "t")])
    assert code == 2 and "--tune-on mix models" in out and "far_other" in out


def test_labels_the_head_cannot_have_are_refused(tmp_path):
    data, ckpt = demo_workspace(tmp_path)
    folder = tmp_path / "twelve"
    for c in range(12):
        (folder / f"class{c:02d}").mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 20 * c, np.uint8)).save(folder / f"class{c:02d}" / "a.png")
    common = ["extract", "--arch", "resnet18", "--checkpoint", ckpt, "--num-classes", "10", "--preprocess", "demo",
              "--cache-dir", str(tmp_path / "c"), "--quiet", "--score", "msp"]
    code, out = run(common + ["--dataset", f"twelve={folder}", "--split", "train"])
    assert code == 2 and "twelve_train: 12 class folders (class00 ... class11)" in out and "--num-classes" in out
    beyond = tmp_path / "beyond.txt"
    beyond.write_text("class00/a.png 3\nclass11/a.png 10\n")
    code, out = run(common + ["--dataset", f"beyond={beyond}", "--data-root", str(folder), "--split", "train"])
    assert code == 2 and "has label 10, which a 10-class head cannot have" in out
    listing = tmp_path / "list.txt"
    listing.write_text("class00/a.png 3\nclass01/a.png -7\n")
    code, out = run(common + ["--dataset", f"odd={listing}", "--data-root", str(folder)])
    assert code == 2 and "has label -7" in out and "class01/a.png" in out
    code, out = run(common + ["--dataset", f"ood_folder={folder}"])      # an OOD folder's classes are never read
    assert code == 0, out


def test_a_constant_score_is_not_reported_as_auroc_50(two_models):
    base, _, _, cache = two_models
    folder = str(base / "same")
    os.makedirs(folder, exist_ok=True)
    for name in ("mine.h5", "mine_val.h5"):
        if not os.path.exists(os.path.join(folder, name)):
            os.symlink(os.path.join(cache, name), os.path.join(folder, name))
    code, out = run(["analyze", "--cache-dir", folder, "--id", "mine", "--ood", "mine_val", "--score", "energy",
                     "--param", "energy.temperature=1e30", "--results", str(base / "k")])
    assert code == 2 and "gives every ID and OOD row the same value" in out
    code, out = run(["analyze", "--cache-dir", folder, "--id", "mine", "--ood", "mine_val", "--score", "energy",
                     "--results", str(base / "k2")])
    assert code == 0, out


@pytest.mark.parametrize("name", ["../escaped", "sub/x", "x.h5", ".hidden"])
def test_dataset_names_are_plain_file_stems(two_models, name, tmp_path):
    base, data, ckpt, _ = two_models
    code, out = run(["extract", "--arch", "resnet18", "--checkpoint", ckpt, "--num-classes", "10", "--preprocess",
                     "demo", "--cache-dir", str(tmp_path / "c"), "--dataset", f"{name}={os.path.join(data, 'noise')}"])
    assert code == 2 and "plain file stem" in out
    assert not os.path.exists(tmp_path / "escaped.h5") and not os.path.exists(tmp_path / "c" / "sub")


def test_a_disk_space_refusal_leaves_nothing_and_its_advice_works(two_models, tmp_path, monkeypatch):
    base, data, ckpt, _ = two_models
    cache = str(tmp_path / "c")
    args = ["extract", "--arch", "resnet18", "--checkpoint", ckpt, "--num-classes", "10", "--preprocess", "demo",
            "--cache-dir", cache, "--quiet", "--dataset", f"n={os.path.join(data, 'noise')}", "--limit", "8"]
    import gradood.extract.runner as R
    real = shutil.disk_usage
    monkeypatch.setattr(R.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    code, out = run(args + ["--policy", "raw"])
    assert code == 2 and "not enough disk space" in out
    assert not os.path.exists(parts_dir(os.path.join(cache, "n.h5")))
    monkeypatch.setattr(R.shutil, "disk_usage", real)
    code, out = run(args + ["--policy", "scores"])
    assert code == 0, out


def test_overwrite_removes_an_unfinished_run(two_models, tmp_path):
    base, data, ckpt, _ = two_models
    cache = str(tmp_path / "c")
    os.makedirs(parts_dir(os.path.join(cache, "n.h5")))
    with open(os.path.join(parts_dir(os.path.join(cache, "n.h5")), "run.json"), "w") as f:
        f.write('{"other": "settings"}')
    code, out = run(["extract", "--arch", "resnet18", "--checkpoint", ckpt, "--num-classes", "10", "--preprocess",
                     "demo", "--cache-dir", cache, "--quiet", "--dataset", f"n={os.path.join(data, 'noise')}",
                     "--limit", "8", "--score", "msp", "--overwrite"])
    assert code == 0 and "removed the unfinished run" in out


def test_plugins_reload_when_edited_and_never_collide(tmp_path):
    first = tmp_path / "a-b.py"
    second = tmp_path / "a_b.py"
    body = "from gradood.analyze import register_score\n\n@register_score({name!r})\ndef f(data):\n    return {expr}\n"
    first.write_text(body.format(name="reload_me", expr="data.logits.max(axis=1)"))
    second.write_text(body.format(name="other_me", expr="-data.logits.max(axis=1)"))
    try:
        assert load_plugin(str(first)) == ["reload_me"]
        assert load_plugin(str(second)) == ["other_me"]          # a distinct module, not a cached one
        old = entry("reload_me").impl
        assert load_plugin(str(first)) == ["reload_me"] and entry("reload_me").impl is old   # unchanged: not re-run
        first.write_text(body.format(name="reload_me", expr="data.logits.min(axis=1)"))
        assert load_plugin(str(first)) == ["reload_me"]
        assert entry("reload_me").impl is not old
        logits = np.array([[1.0, 5.0], [2.0, -3.0]])

        class Block:
            pass
        block = Block()
        block.logits = logits
        np.testing.assert_array_equal(entry("reload_me").impl(block), logits.min(axis=1))
    finally:
        SCORES.pop("reload_me", None)
        SCORES.pop("other_me", None)


def test_symlink_loops_and_named_pipes_neither_multiply_nor_hang(tmp_path):
    from gradood.extract.datasets import build_transform, open_dataset
    root = tmp_path / "set"
    (root / "a").mkdir(parents=True)
    for j in range(2):
        Image.fromarray(np.full((8, 8, 3), 50 * j, np.uint8)).save(root / "a" / f"{j}.png")
    os.symlink(".", root / "self")                   # a loop at the top
    os.symlink("..", root / "a" / "up")              # and one inside a class folder
    os.mkfifo(root / "a" / "pipe.png")               # would block a reader forever
    transform, _ = build_transform("demo")
    ds = open_dataset(str(root), "folder", "", transform, "set")
    assert len(ds) == 2 and sorted(os.path.basename(p) for p in ds.paths) == ["0.png", "1.png"]


def test_an_unfinished_ood_cache_never_drops_out_unseen(two_models, tmp_path):
    base, data, ckpt, cache = two_models
    folder = folder_with_id_cache(cache, tmp_path)
    images = tmp_path / "broken" / "x"
    images.mkdir(parents=True)
    for j in range(6):
        Image.fromarray(np.full((32, 32, 3), 30 * j, np.uint8)).save(images / f"{j}.png")
    (images / "z.png").write_bytes(b"not an image")
    code, out = run(["extract", "--arch", "resnet18", "--checkpoint", ckpt, "--num-classes", "10", "--preprocess",
                     "demo", "--cache-dir", str(folder), "--quiet", "--score", "msp", "--batch-size", "2",
                     "--dataset", f"broken={tmp_path / 'broken'}"])
    assert code == 2 and "cannot read image" in out
    code, out = run(["analyze", "--cache-dir", str(folder), "--id", "mine", "--score", "msp",
                     "--results", str(tmp_path / "r")])
    assert code == 2 and "broken.h5 is incomplete" in out
    code, out = run(["analyze", "--cache-dir", str(folder), "--id", "mine", "--score", "msp", "--allow-partial",
                     "--results", str(tmp_path / "r2")])
    assert code == 0 and "PARTIAL" in out and "broken" in out
    from gradood.store.inspect import summary
    assert "PARTIAL" in summary(str(folder / "broken.h5.parts"))     # the folder itself, no raw errno


@pytest.mark.parametrize("line,message", [
    ("a.png\t3", "a tab separates the fields"),
    ("a.png 3 extra", "is not 'relative/path label'"),
    ("a.png 3.0", "label '3.0' is not an integer"),
])
def test_malformed_image_lists_name_the_line(tmp_path, line, message):
    from gradood.extract.datasets import ImageList
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 1\n" + line + "\n")
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        ImageList(str(listing), str(tmp_path), None)
    assert f"{listing}:2:" in str(err.value)


def test_image_list_encodings(tmp_path):
    from gradood.extract.cli_support import dataset_specs
    from gradood.extract.datasets import ImageList
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfa.png 2\n")
    assert ImageList(str(bom), str(tmp_path), None).samples == [(str(tmp_path / "a.png"), 2)]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"a.png 1\ncaf\xe9.png 2\n")
    with pytest.raises(ValueError, match=re.escape(f"{latin}:2: not UTF-8 text")):
        ImageList(str(latin), str(tmp_path), None)
    (spec,) = dataset_specs(None, (f"x={tmp_path / 'LIST.LST'}",), str(tmp_path), "test")
    assert spec.kind == "list"


def test_messages_name_the_file_the_attribute_and_sizes(tmp_path):
    import h5py
    from gradood.analyze.registry import requirements
    from gradood.extract.runner import _size
    from bench.helpers import extract_tensor
    from gradood.store.reader import CacheReader
    from gradood.store.schema import CacheError
    assert (_size(0), _size(3 * 2 ** 20), _size(1536)) == ("0 B", "3.00 MiB", "1.50 KiB")
    with pytest.raises(ValueError, match="tau must be >= 0"):
        requirements(["gaia_z"], {"gaia_z": {"tau": -1.0}})
    model = randomize_norms(build_model("resnet18", 10))
    path = extract_tensor(model, "resnet18", torch.randn(2, 3, 32, 32), str(tmp_path / "c.h5"), ["msp"])
    with h5py.File(path, "r+") as f:
        f.attrs["plan"] = "{not json"
    with pytest.raises(CacheError, match=re.escape(f"{path}: root attribute 'plan' is not valid JSON")):
        CacheReader(path)


def test_files_skipped_by_extension_are_counted(two_models, tmp_path):
    base, data, ckpt, _ = two_models
    folder = tmp_path / "set" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "0.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "1.gif")
    code, out = run(["extract", "--arch", "resnet18", "--checkpoint", ckpt, "--num-classes", "10", "--preprocess",
                     "demo", "--cache-dir", str(tmp_path / "c"), "--quiet", "--score", "msp",
                     "--dataset", f"s={tmp_path / 'set'}"])
    assert code == 0 and "1 file(s) ignored, not image files: 1 .gif" in out


def test_a_plugin_crash_in_a_sweep_is_not_called_unservable(two_models, tmp_path):
    base, _, _, cache = two_models
    plugin = tmp_path / "buggy.py"
    plugin.write_text("from gradood.analyze import register_score\n\n@register_score('buggy', grid=[{'k': [1, 2]}])\n"
                      "def buggy(data, k=1):\n    return data.logits[:, 99]\n")
    try:
        code, out = run(["sweep", "--cache-dir", cache, "--id", "mine", "--ood", "near", "--plugin", str(plugin),
                         "--grid", "buggy:k=1,2", "--results", str(tmp_path / "s")])
    finally:
        SCORES.pop("buggy", None)
    assert code == 0 and "variants CRASHED" in out and "IndexError" in out


def test_layer_charts_start_at_zero(tmp_path, monkeypatch):
    import gradood.analyze.plots as P
    limits = []
    real = P._save

    def keep(plt, fig, out_dir, name):
        limits.append(fig.axes[0].get_ylim())
        return real(plt, fig, out_dir, name)
    monkeypatch.setattr(P, "_save", keep)
    from gradood.analyze.results import SweepResult
    rows = [{"score": "gaia_z", "params": {"layers": [l]}, "average": {"AUROC": a}}
            for l, a in (("bn1", 0.91), ("layer1.0.bn1", 0.95))]
    sweep = SweepResult(rows=rows, errors=[], reported=[], select_on=None, metric="AUROC", selected={},
                        seconds=0.0, n_variants=len(rows), workers=1, id="digits")
    P.layer_contribution(sweep, str(tmp_path))
    assert limits == [(0.0, 100.0)]


def test_a_set_whose_every_image_was_unreadable_is_named(two_models, tmp_path):
    base, data, ckpt, cache = two_models
    folder = folder_with_id_cache(cache, tmp_path)
    bad = tmp_path / "bad" / "x"
    bad.mkdir(parents=True)
    for j in range(3):
        (bad / f"{j}.png").write_bytes(b"not an image")
    code, out = run(["extract", "--arch", "resnet18", "--checkpoint", ckpt, "--num-classes", "10", "--preprocess",
                     "demo", "--cache-dir", str(folder), "--quiet", "--score", "msp", "--skip-bad",
                     "--dataset", f"bad={tmp_path / 'bad'}"])
    assert code == 0, out
    code, out = run(["analyze", "--cache-dir", str(folder), "--id", "mine", "--score", "msp",
                     "--results", str(tmp_path / "r")])
    assert code == 2 and "all 3 rows of set 'bad' were skipped" in out


def test_an_unknown_nac_layer_is_named(two_models, tmp_path):
    base, _, _, cache = two_models
    code, out = run(["analyze", "--cache-dir", cache, "--id", "mine", "--ood", "near", "--score", "nac",
                     "--param", "nac.layers=nonexistent", "--results", str(tmp_path / "r")])
    assert code == 2 and "nonexistent" in out


def test_a_crashing_plugin_under_score_all_stops_the_run_naming_itself(tmp_path):
    """Under --score all only "this cache cannot serve it" becomes a note; a score that
    raises (a bug) stops the run with the score, the cache and the cause."""
    from gradood.store.synthetic import write_synthetic
    folder = tmp_path / "syn"
    write_synthetic(str(folder / "syn_train.h5"), 600, num_classes=5, dim=8, seed=1, split="train")
    write_synthetic(str(folder / "syn.h5"), 200, num_classes=5, dim=8, seed=2)
    write_synthetic(str(folder / "far.h5"), 100, num_classes=5, dim=8, seed=3, novel=1.0)
    plugin = tmp_path / "broken.py"
    plugin.write_text("from gradood.analyze import register_score\n\n@register_score('broken')\n"
                      "def broken(data):\n    return data.logits[:, 99]\n")
    try:
        code, out = run(["analyze", "--cache-dir", str(folder), "--id", "syn", "--plugin", str(plugin),
                         "--results", str(tmp_path / "r")])
    finally:
        SCORES.pop("broken", None)
    assert code != 0
    assert "broken crashed on" in out and "syn" in out and "IndexError" in out
    assert not (tmp_path / "r" / "summary.md").exists()
    code, out = run(["analyze", "--cache-dir", str(folder), "--id", "syn", "--results", str(tmp_path / "r2")])
    assert code == 0 and "left out" in out          # notes stay for what the caches cannot serve


def test_a_file_given_as_cache_folder_and_a_parts_folder_without_run_json_are_named(tmp_path):
    f = tmp_path / "digits.h5"
    f.write_bytes(b"")
    code, out = run(["analyze", "--cache-dir", str(f), "--id", "digits"])
    assert code == 2 and "is a file, not a folder of caches" in out and "Traceback" not in out, out
    (tmp_path / "x.h5.parts").mkdir()
    code, out = run(["inspect", str(tmp_path / "x.h5")])
    assert code == 2 and "holds no run.json" in out and "remove" in out and "Errno" not in out, out
