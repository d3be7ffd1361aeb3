"""Settings and labels that contradict the model, edited caches and the user's own model
files: each is refused in one line naming the file, the option and the fix, before any
file is written, and never as a traceback."""
import json
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from bench.helpers import run_cli as run
from gradood.store.synthetic import write_synthetic

MODELS = '''
import torch.nn as nn


def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def five(num_classes):
    return build(5)


def noarg():
    return build(3)


def broken(num_classes):
    layers = {}
    return layers["head"]


def flat(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, num_classes))


def silu(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


def folder(base, classes, per_class=2, side=16):
    """An ImageFolder of ``classes`` class folders of ``per_class`` PNGs each."""
    for c in range(classes):
        d = base / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.fromarray(np.full((side, side, 3), 20 * c + j, np.uint8)).save(d / f"{j}.png")
    return str(base)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("refusals")
    (base / "models.py").write_text(MODELS)
    import importlib.util
    spec = importlib.util.spec_from_file_location("refusal_models", base / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.build(10).state_dict(), base / "w10.pt")
    torch.save(module.five(10).state_dict(), base / "w5.pt")
    torch.save(module.flat(10).state_dict(), base / "flat.pt")
    images = folder(base / "imgs", 4)
    return base, images


def extract(base, *args, func="build", ckpt="w10.pt"):
    """``pipeline.py extract`` of the test's model file (32x32 inputs; MSP unless --score)."""
    return run(["extract", "--model-file", f"{base / 'models.py'}:{func}", "--num-classes", "10",
                "--preprocess", "demo", "--checkpoint", str(base / ckpt), "--quiet", "--batch-size", "4",
                *(() if "--score" in args else ("--score", "msp")), *args])


def one_line(code, out):
    assert code == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    return out


def test_model_file_faults_are_one_line(work, tmp_path):
    base, images = work
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.nn as nn\n\ndef build(num_classes)\n    return nn.Linear(2, num_classes)\n")
    out = one_line(*run(["extract", "--model-file", f"{bad}:build", "--num-classes", "10", "--preprocess",
                         "demo", "--checkpoint", str(base / "w10.pt"), "--dataset", f"x={images}",
                         "--cache-dir", str(tmp_path / "c")]))
    assert f"{bad}:build" in out and "line 3" in out and "syntax error" in out
    out = one_line(*extract(base, "--dataset", f"x={images}", "--cache-dir", str(tmp_path / "c"), func="noarg"))
    assert "noarg is called as noarg(num_classes)" in out and "give it a num_classes parameter" in out
    out = one_line(*extract(base, "--dataset", f"x={images}", "--cache-dir", str(tmp_path / "c"), func="broken"))
    line = MODELS.splitlines().index('    return layers["head"]') + 1
    assert f"broken(10) raised KeyError at models.py line {line}: 'head'" in out
    out = one_line(*extract(base, "--dataset", f"x={images}", "--cache-dir", str(tmp_path / "c"), func="five",
                            ckpt="w5.pt"))
    assert "gives 5 logits per image, but --num-classes is 10" in out and "give --num-classes 5" in out
    code, out = run(["scores", "--model-file", f"{base / 'models.py'}:five", "--num-classes", "10"])
    assert code == 2 and "gives 5 logits per image" in out          # scores and extract agree
    assert not os.path.exists(tmp_path / "c")


def test_a_head_that_is_no_linear_map_is_refused_before_any_file(work, tmp_path):
    base, images = work
    cache = tmp_path / "c"
    out = one_line(*extract(base, "--dataset", f"t={images}", "--cache-dir", str(cache), "--head", "0"))
    assert "--head 0: a 3x3 nn.Conv2d is not a linear map" in out
    assert not cache.exists() or not os.listdir(cache)
    code, out = run(["scores", "--model-file", f"{base / 'models.py'}:build", "--num-classes", "10",
                     "--head", "0"])
    assert code == 2 and "a 3x3 nn.Conv2d is not a linear map" in out
    code, out = extract(base, "--dataset", f"t={images}", "--cache-dir", str(cache))      # the corrected command
    assert code == 0, out


def test_another_input_size_is_named_with_the_option(work, tmp_path):
    base, images = work
    out = one_line(*extract(base, "--dataset", f"x={images}", "--cache-dir", str(tmp_path / "c"), func="flat",
                            ckpt="flat.pt"))
    assert "fails on a 3x32x32 input" in out and "--image-size" in out and "mat1 and mat2" in out
    code, out = extract(base, "--dataset", f"x={images}", "--cache-dir", str(tmp_path / "c"), "--image-size", "64",
                        func="flat", ckpt="flat.pt")
    assert code == 0, out


def test_class_folders_beyond_the_head(work, tmp_path):
    base, _ = work
    many = folder(tmp_path / "many", 12, per_class=1)
    cache = str(tmp_path / "c")
    out = one_line(*extract(base, "--dataset", f"mine={many}", "--cache-dir", cache, "--split", "train"))
    assert "mine_train: 12 class folders (c00 ... c11)" in out and "the head has 10 classes" in out
    code, out = extract(base, "--dataset", f"mine={many}", "--cache-dir", cache)
    assert code == 0 and "note: mine: 12 class folders" in out and "refused by analysis as an ID set" in out
    code, out = extract(base, "--dataset", f"other={folder(tmp_path / 'few', 2, per_class=1)}", "--cache-dir", cache)
    assert code == 0, out
    out = one_line(*run(["analyze", "--cache-dir", cache, "--id", "mine", "--ood", "other", "--score", "msp",
                         "--results", str(tmp_path / "r")]))
    assert "has labels 10, 11, which its 10-class head cannot produce" in out and "--num-classes" in out
    code, out = run(["analyze", "--cache-dir", cache, "--id", "other", "--ood", "mine", "--score", "msp",
                     "--results", str(tmp_path / "r")])
    assert code == 0, out                            # as an OOD set its labels are never read


def test_a_checkpoint_with_more_than_tensors_names_the_file_and_the_entries(work, tmp_path):
    base, images = work
    state = torch.load(base / "w10.pt")
    ckpt = tmp_path / "with_epoch.pt"
    torch.save({**state, "epoch": 7}, ckpt)
    out = one_line(*extract(base, "--dataset", f"x={images}", "--cache-dir", str(tmp_path / "c"), ckpt=ckpt))
    assert f"{ckpt} holds no state dict: 1 of its" in out and "'epoch': int" in out


def test_an_image_list_with_a_third_column_says_so(work, tmp_path):
    base, images = work
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"c00/{j}.png 0 {j}\n" for j in range(2)))
    out = one_line(*extract(base, "--dataset", f"x={listing}", "--data-root", images,
                            "--cache-dir", str(tmp_path / "c")))
    assert f"{listing}:1: 'c00/0.png 0 0' has 3 fields" in out and "two fields" in out


def test_another_limit_over_the_same_images_is_the_same_cache(work, tmp_path):
    base, images = work
    cache = str(tmp_path / "c")
    code, out = extract(base, "--dataset", f"x={images}", "--cache-dir", cache, "--limit", "16")
    assert code == 0 and "taking all 8" in out, out
    code, out = extract(base, "--dataset", f"x={images}", "--cache-dir", cache, "--limit", "100")
    assert code == 0 and "up to date" in out, out
    code, out = extract(base, "--dataset", f"x={images}", "--cache-dir", cache)
    assert code == 0 and "up to date" in out, out
    out = one_line(*extract(base, "--dataset", f"x={images}", "--cache-dir", cache, "--limit", "4"))
    assert "it holds other rows of the set (" in out and "subset.limit: None in the cache, 4 now" in out
    assert "another model" not in out


# ------------------------------------------------------------------ analysis side
def test_checkpoint_folders_must_hold_the_same_sets_in_either_order(tmp_path):
    for folder, world in (("a", 0), ("d_no_o2", 1)):
        write_synthetic(str(tmp_path / folder / "syn.h5"), 30, num_classes=5, dim=8, seed=2, world_seed=world)
        write_synthetic(str(tmp_path / folder / "o1.h5"), 20, num_classes=5, dim=8, seed=3, novel=1.0,
                        world_seed=world)
    write_synthetic(str(tmp_path / "a" / "o2.h5"), 20, num_classes=5, dim=8, seed=4, novel=1.0)
    for order in ("d_no_o2,a", "a,d_no_o2"):
        dirs = ",".join(str(tmp_path / d) for d in order.split(","))
        out = one_line(*run(["analyze", "--checkpoint-dirs", dirs, "--id", "syn", "--score", "msp",
                             "--results", str(tmp_path / "r")]))
        assert f"{tmp_path / 'd_no_o2'} holds no o2.h5, which {tmp_path / 'a'} holds" in out and "--ood" in out
    code, out = run(["analyze", "--checkpoint-dirs", f"{tmp_path / 'd_no_o2'},{tmp_path / 'a'}", "--id", "syn",
                     "--ood", "o1", "--score", "msp", "--results", str(tmp_path / "r")])
    assert code == 0, out
    write_synthetic(str(tmp_path / "k5" / "syn.h5"), 30, num_classes=5, dim=8, seed=2, world_seed=2)
    write_synthetic(str(tmp_path / "k5" / "o1.h5"), 20, num_classes=5, dim=8, seed=3, novel=1.0, world_seed=2)
    write_synthetic(str(tmp_path / "k10" / "syn.h5"), 30, num_classes=10, dim=8, seed=2, world_seed=3)
    write_synthetic(str(tmp_path / "k10" / "o1.h5"), 20, num_classes=10, dim=8, seed=3, novel=1.0, world_seed=3)
    out = one_line(*run(["analyze", "--checkpoint-dirs", f"{tmp_path / 'k10'},{tmp_path / 'k5'}", "--id", "syn",
                         "--score", "msp", "--results", str(tmp_path / "r")]))
    assert "comes from a 5-class model" in out and "10-class" in out and "broadcast" not in out


def test_a_compared_score_the_caches_cannot_serve_is_named_with_its_reason(tmp_path):
    write_synthetic(str(tmp_path / "c" / "syn.h5"), 30, num_classes=5, dim=8, seed=2)
    write_synthetic(str(tmp_path / "c" / "far.h5"), 20, num_classes=5, dim=8, seed=3, novel=1.0)
    out = one_line(*run(["analyze", "--cache-dir", str(tmp_path / "c"), "--id", "syn", "--compare", "msp,knn",
                         "--results", str(tmp_path / "r")]))
    assert "knn: needs the fitting cache" in out and "syn_train.h5" in out and "two different" not in out


@pytest.mark.parametrize("edit,expected", [
    (lambda l: {**l, "1": "BOGUS"}, "1: 'BOGUS' is not one of NC, NCHW, NHWC, NTC"),
    (lambda l: {**l, "1": "NTC"}, "1: NTC does not fit its stored shape [8, 32, 32]"),
    (lambda l: {k: v for k, v in l.items() if k != "1"}, "its layers differ from 'layers' (1)"),
    (lambda l: {k: 3 for k in l}, "1: 3 is not one of"),
], ids=["bogus", "ntc-on-a-map", "dropped", "integers"])
def test_edited_layer_layouts_are_refused(work, tmp_path, edit, expected):
    """The cache's layer "1" is the model's BatchNorm, an 8x32x32 map (GAIA-Z's layer)."""
    base, images = work
    cache = tmp_path / "c"
    code, out = extract(base, "--dataset", f"x={images}", "--cache-dir", str(cache), "--score", "gaia_z")
    assert code == 0, out
    code, out = run(["inspect", str(cache / "x.h5")])
    assert code == 0, out
    with h5py.File(cache / "x.h5", "r+") as f:
        layouts = json.loads(f.attrs["layer_layouts"])
        assert layouts["1"] == "NCHW", layouts
        f.attrs["layer_layouts"] = json.dumps(edit(layouts))
    out = one_line(*run(["inspect", str(cache / "x.h5")]))
    assert "attribute 'layer_layouts' should be" in out and expected in out, out


def test_a_training_limit_that_leaves_classes_out_says_so(work, tmp_path):
    base, images = work            # 4 class folders of 2 images each
    code, out = extract(base, "--dataset", f"x={images}", "--cache-dir", str(tmp_path / "c"), "--split", "train",
                        "--limit", "4")
    assert code == 0 and "note: x_train: the first 4 images in folder order hold no image of class(es) 2, 3" in out
    assert "--balanced" in out
    code, out = extract(base, "--dataset", f"y={images}", "--cache-dir", str(tmp_path / "c"), "--split", "train",
                        "--limit", "4", "--balanced")
    assert code == 0 and "note" not in out, out


def test_a_hook_set_the_model_lacks_names_the_override_that_defines_it(work):
    base, _ = work
    code, out = run(["scores", "--model-file", f"{base / 'models.py'}:build", "--num-classes", "10",
                     "--image-size", "32"])
    assert code == 0 and "gaia_a: not served: hook set 'before_head' is not defined" in out
    assert "define it for this model with --hook-set before_head=MODULE" in out
    code, out = run(["scores", "--model-file", f"{base / 'models.py'}:build", "--num-classes", "10",
                     "--image-size", "32", "--hook-set", "before_head=1,4"])   # the BN, then the pooled features
    row = next(line for line in out.splitlines() if line.startswith("gaia_a "))
    assert code == 0 and " yes " in row, out



def test_gaia_z_behind_an_activation_without_exact_zeros_carries_the_tau_note(work, tmp_path):
    """BatchNorm + SiLU (EfficientNetV2's blocks): exact zeros of the gradient are rare, the
    counts near constant; `scores` and the extracted cache's analysis say so and name tau."""
    base, images = work
    code, out = run(["scores", "--model-file", f"{base / 'models.py'}:silu", "--num-classes", "10",
                     "--image-size", "32"])
    note = next(line for line in out.splitlines() if line.strip().startswith("gaia_z:"))
    assert code == 0 and "followed by SiLU, not ReLU" in note and "gaia_z.tau=T" in note, out
    code, out = run(["scores", "--model-file", f"{base / 'models.py'}:build", "--num-classes", "10",
                     "--image-size", "32"])
    assert code == 0 and "tau" not in next(line for line in out.splitlines() if line.strip().startswith("gaia_z:"))
    import importlib.util
    spec = importlib.util.spec_from_file_location("refusal_models_silu", base / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.silu(10).state_dict(), tmp_path / "silu.pt")
    cache = str(tmp_path / "c")
    for name in ("x", "y"):
        code, out = extract(base, "--dataset", f"{name}={images}", "--cache-dir", cache, "--score", "gaia_z",
                            func="silu", ckpt=tmp_path / "silu.pt")
        assert code == 0, out
    with h5py.File(os.path.join(cache, "x.h5"), "r") as f:
        assert json.loads(f.attrs["layer_activations"])["1"] == "SiLU"
    code, out = run(["analyze", "--cache-dir", cache, "--id", "x", "--ood", "y", "--score", "gaia_z",
                     "--results", str(tmp_path / "r")])
    assert "followed by SiLU, not ReLU" in out and "gaia_z.tau=T" in out, out
