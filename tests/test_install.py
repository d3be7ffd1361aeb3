"""`pip install .` installs the analysis stage only: no torch, and `gradood analyze` works."""
import os
import subprocess
import sys

import torch

from gradood.extract.models import build_model
from helpers import extract_tensor, randomize_norms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_analysis_only_install_pulls_no_torch_and_analyses(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    g = torch.Generator().manual_seed(0)
    for name, scale in (("idset", 1.0), ("far", 3.0)):
        extract_tensor(model, "resnet18", scale * torch.randn(12, 3, 32, 32, generator=g),
                       str(tmp_path / "c" / f"{name}.h5"), ["gaia_z", "msp", "energy"], name=name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", os.path.join(ROOT, "constraints.txt"),
                          ROOT], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    listed = subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True).stdout
    assert "torch" not in listed.lower() and "pandas" in listed.lower()
    run = subprocess.run([str(venv / "bin" / "gradood"), "analyze", "--cache-dir", str(tmp_path / "c"),
                          "--id", "idset", "--results", str(tmp_path / "r")], capture_output=True, text=True,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "GAIA-Z" in run.stdout and "far FPR95/AUROC" in run.stdout
    run = subprocess.run([str(venv / "bin" / "gradood"), "extract", "--benchmark", "demo", "--dry-run"],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode == 2 and "gradood[extract]" in run.stderr
