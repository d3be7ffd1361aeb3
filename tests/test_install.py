"""The wheel holds one import name, ``gradood``, and installs the analysis stage only: no
torch, and `gradood analyze` works.

The torch-free install is built without the package index: a bare venv receives the wheel
(``pip --python VENV install --no-deps``, which writes the console script) and links to the
installed distributions its ``Requires-Dist`` closure names, resolved here with the
versions of this environment. torch is not in that closure, so it is absent from the venv
and any import of it there fails. Resolving the same requirements from the registry is
what ``make install`` does."""
import importlib.metadata as metadata
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from packaging.requirements import Requirement

from bench.helpers import extract_tensor, randomize_norms
from gradood.extract.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """The project's wheel, built from this checkout; returns its path."""
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(out), ROOT], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (path,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl")]
    return path


def wheel_metadata(path):
    """``(names, METADATA text, entry_points.txt text)`` of a wheel."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    return names, meta, scripts


def requirement_closure(requires):
    """Names of the installed distributions that ``requires`` (Requires-Dist lines, extras
    not selected) pulls in, recursively, as resolved in this environment."""
    seen, todo = set(), list(requires)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = metadata.distribution(req.name).metadata["Name"].lower().replace("_", "-")
        if name not in seen:
            seen.add(name)
            todo.extend(metadata.distribution(name).requires or [])
    return seen


def test_the_wheel_holds_one_import_name_and_torch_only_as_an_extra(wheel):
    names, meta, scripts = wheel_metadata(wheel)
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"gradood"}
    for part in ("analyze", "extract", "store", "analyze/scores/baselines", "extract/models"):
        assert f"gradood/{part}/__init__.py" in names
    assert {"gradood/pipeline.py", "gradood/__main__.py", "gradood/analyze/scores/baselines/knn.py"} <= set(names)
    assert not [n for n in names if n.startswith(("gradood/tests", "gradood/bench", "gradood/docs"))]
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    torch_lines = [line for line in requires if line.split()[1].startswith(("torch", "torchvision"))]
    assert len(torch_lines) == 2 and all('extra == "extract"' in line for line in torch_lines)
    assert "gradood = gradood.pipeline:cli" in scripts
    closure = requirement_closure(line.split(":", 1)[1] for line in requires)
    assert {"numpy", "h5py", "scikit-learn", "pandas"} <= closure and not {"torch", "torchvision"} & closure


def test_analysis_only_install_pulls_no_torch_and_analyses(tmp_path, wheel):
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    g = torch.Generator().manual_seed(0)
    for name, scale in (("idset", 1.0), ("far", 3.0)):
        extract_tensor(model, "resnet18", scale * torch.randn(12, 3, 32, 32, generator=g),
                       str(tmp_path / "c" / f"{name}.h5"), ["gaia_z", "msp", "energy"], name=name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    _, meta, _ = wheel_metadata(wheel)
    for name in requirement_closure(line.split(":", 1)[1] for line in meta.splitlines()
                                    if line.startswith("Requires-Dist:")):
        dist = metadata.distribution(name)
        for top in {str(f).split("/")[0] for f in dist.files if not str(f).startswith("..")}:
            source = os.path.join(str(dist.locate_file("")), top)
            if os.path.exists(source) and not os.path.exists(os.path.join(site, top)):
                os.symlink(source, os.path.join(site, top))
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                          "--no-index", wheel], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr

    def run(*args):
        return subprocess.run(list(args), capture_output=True, text=True, cwd=str(tmp_path))
    listed = run(python, "-c", "import importlib.metadata as m; print(sorted(d.metadata['Name'] for d in m.distributions()))")
    assert "torch" not in listed.stdout.lower() and "pandas" in listed.stdout.lower(), listed
    done = run(python, "-c", "import torch")
    assert done.returncode == 1 and "ModuleNotFoundError" in done.stderr
    done = run(str(venv / "bin" / "gradood"), "analyze", "--cache-dir", str(tmp_path / "c"), "--id", "idset",
               "--results", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert "GAIA-Z" in done.stdout and "far FPR95/AUROC" in done.stdout
    done = run(python, "-m", "gradood", "--help")
    assert done.returncode == 0 and "analyze" in done.stdout
    done = run(python, "-c", "import gradood.analyze, sys; assert 'torch' not in sys.modules")
    assert done.returncode == 0, done.stderr
    for other in ("analyze", "extract", "store", "pipeline"):
        done = run(python, "-c", f"import {other}")
        assert done.returncode == 1 and "ModuleNotFoundError" in done.stderr, other
    done = run(str(venv / "bin" / "gradood"), "extract", "--benchmark", "demo", "--dry-run")
    assert done.returncode == 2 and "gradood[extract]" in done.stderr
