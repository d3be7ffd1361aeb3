"""The wheel holds one import name, ``gradood``, and installs the analysis stage only: no
torch, and `gradood analyze` works."""
import os
import subprocess
import sys
import zipfile

import torch

from bench.helpers import extract_tensor, randomize_norms
from gradood.extract.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_wheel(out):
    """The project's wheel, built from this checkout into ``out``; returns its path."""
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(out), ROOT], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (wheel,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl")]
    return wheel


def test_the_wheel_holds_one_import_name_and_torch_only_as_an_extra(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"gradood"}
    for part in ("analyze", "extract", "store", "analyze/scores/baselines", "extract/models"):
        assert f"gradood/{part}/__init__.py" in names
    assert {"gradood/pipeline.py", "gradood/__main__.py", "gradood/analyze/scores/baselines/knn.py"} <= set(names)
    assert not [n for n in names if n.startswith(("gradood/tests", "gradood/bench", "gradood/docs"))]
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    torch_lines = [line for line in requires if line.split()[1].startswith(("torch", "torchvision"))]
    assert len(torch_lines) == 2 and all('extra == "extract"' in line for line in torch_lines)
    assert "gradood = gradood.pipeline:cli" in scripts


def test_analysis_only_install_pulls_no_torch_and_analyses(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    g = torch.Generator().manual_seed(0)
    for name, scale in (("idset", 1.0), ("far", 3.0)):
        extract_tensor(model, "resnet18", scale * torch.randn(12, 3, 32, 32, generator=g),
                       str(tmp_path / "c" / f"{name}.h5"), ["gaia_z", "msp", "energy"], name=name)
    wheel = build_wheel(tmp_path / "wheel")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", os.path.join(ROOT, "constraints.txt"),
                          wheel], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    listed = subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True).stdout
    assert "torch" not in listed.lower() and "pandas" in listed.lower()
    python = str(venv / "bin" / "python")

    def run(*args):
        return subprocess.run(list(args), capture_output=True, text=True, cwd=str(tmp_path))
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
