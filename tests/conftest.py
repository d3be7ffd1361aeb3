"""Shared test configuration and session fixtures. The package under test is ``gradood``
as installed (``make install``: an editable install of this checkout). What the tests
share with the benchmarks (small models, in-memory extraction, the authors' passes
re-implemented) is the package ``bench`` of this checkout (``pythonpath = .`` in
setup.cfg).

Session fixtures are built once and read only; a test that changes their files copies
them first (``shutil.copytree``). A test module's costly fixtures are session-scoped too,
although one module uses them: pytest-xdist (``make test``) interleaves modules on a
worker, and pytest rebuilds a module fixture each time its module comes back."""
import os
import shutil

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on two cores: one thread each, for torch,
    # numpy and scikit-learn here and in every process a test starts (set before they load)
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest

from bench.helpers import demo_workspace, run_cli
from gradood.store.benchmarks import BENCHMARKS

# which demo images stand in for each OpenOOD v1.5 set of openood_cifar10, and how many
OPENOOD_STAND_INS = {"cifar10": ("digits/test", 24, 0), "cifar10_train": ("digits/train", 40, 0),
                     "cifar10_val": ("digits/test", 12, 24), "cifar100": ("mashups", 10, 0),
                     "tin": ("shapes", 10, 0), "mnist": ("noise", 8, 0), "svhn": ("textures", 8, 0),
                     "texture": ("textures", 8, 0), "places365": ("photo_patches", 8, 0), "tin_val": ("shapes", 8, 10),
                     "cifar10c": ("digits/test", 12, 36)}


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory):
    """``(data, ckpt)``: the demo images and a random-norm demo-layout checkpoint, built once
    per session. Read-only: a test that changes images or weights makes its own."""
    return demo_workspace(tmp_path_factory.mktemp("demo_files"))


def build_openood_root(base, demo):
    """An OpenOOD v1.5 data root for ``openood_cifar10`` under ``base`` made of copies of the
    demo images under ``demo`` (image lists + images_classic, as OpenOOD's download script
    lays them out); returns (root, {set: image folder})."""
    root = str(base)
    preset = BENCHMARKS["openood_cifar10"]
    folders = {}
    for name, (_, rel, images) in preset.sets.items():
        src, n, skip = OPENOOD_STAND_INS[name]
        split = "val" if name.endswith("_val") else ("train" if name.endswith("_train") else "test")
        dest_dir = os.path.join(root, images, name.replace("_val", "").replace("_train", ""), split)
        ood = name not in ("cifar10", "cifar10_train", "cifar10_val", *preset.csid)
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(demo, src))
                       for f in fs if f.endswith(".png"))[skip:skip + n]
        lines = []
        for path in files:
            cls = os.path.basename(os.path.dirname(path))
            target = os.path.join(dest_dir, cls, os.path.basename(path))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(path, target)
            label = -1 if ood else (int(cls) if cls.isdigit() else 0)
            lines.append(f"{os.path.relpath(target, os.path.join(root, images))} {label}")
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write("\n".join(lines) + "\n")
        folders[name] = dest_dir
    return root, folders


@pytest.fixture(scope="session")
def openood_root(tmp_path_factory, demo_files):
    """``(root, ckpt, folders)``: the OpenOOD stand-in data root, the demo checkpoint and
    each set's image folder. Read-only."""
    data, ckpt = demo_files
    root, folders = build_openood_root(tmp_path_factory.mktemp("openood_root"), data)
    return root, ckpt, folders


def openood_extraction(root, ckpt, cache):
    """docs/openood.md's extraction command (every set of openood_cifar10) as arguments."""
    return ["extract", "--benchmark", "openood_cifar10", "--data-root", root, "--arch", "resnet18",
            "--checkpoint", ckpt, "--preprocess", "demo", "--dataset", "all", "--cache-dir", cache, "--quiet"]


@pytest.fixture(scope="session")
def openood_caches(tmp_path_factory, openood_root):
    """A folder of caches of every openood_cifar10 set, made by docs/openood.md's command.
    Read-only."""
    root, ckpt, _ = openood_root
    cache = str(tmp_path_factory.mktemp("openood_caches"))
    code, out = run_cli(openood_extraction(root, ckpt, cache))
    assert code == 0, out
    return cache


# `make test` hands whole modules to two pytest-xdist workers (--dist loadfile), in the
# order of the items (--no-loadscope-reorder): the first worker starts with the first and
# the third module, the second with the second and the fourth, then each takes the next
# module when it is done. The modules that take longest (30-80 s each under `make test` on
# 2 cores, `--durations`) go first, so that the last ones to run are short and neither
# worker waits long for the other; test_openood goes third, to the worker of test_readme,
# which has built the session's OpenOOD caches they share. The order changes no result.
LONGEST_FIRST = ("test_readme.py", "test_faults.py", "test_openood.py", "test_posthoc.py", "test_distributed.py",
                 "test_models.py", "test_maha_ensemble.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
