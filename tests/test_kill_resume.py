"""kill -9 during extraction, rerun the same command: the cache equals an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from analyze.scores import compute_score
from extract.demo_data import build_demo_data
from extract.models import build_model
from helpers import randomize_norms
from store.reader import CacheReader
from store.writer import list_parts, parts_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(data, ckpt, cache):
    return [sys.executable, os.path.join(ROOT, "pipeline.py"), "extract", "--benchmark", "demo",
            "--data-root", data, "--checkpoint", ckpt, "--cache-dir", cache, "--dataset", "shapes",
            "--limit", "48", "--batch-size", "4", "--quiet", "--score", "gaia_z", "--score", "gaia_a"]


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    data = build_demo_data(str(tmp_path / "data"))
    ckpt = str(tmp_path / "m.pt")
    torch.manual_seed(0)
    torch.save(randomize_norms(build_model("resnet18", 10)).state_dict(), ckpt)
    env = {**os.environ, "PYTHONPATH": ROOT}

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(command(data, ckpt, killed), env=env, cwd=ROOT)
    target = os.path.join(killed, "shapes.h5")
    deadline = time.time() + 120
    while len(list_parts(parts_dir(target))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(target), "the run finished before it could be killed"
    done_before = len(list_parts(parts_dir(target)))
    assert 0 < done_before < 12

    subprocess.run(command(data, ckpt, killed), env=env, cwd=ROOT, check=True)
    reference = str(tmp_path / "whole")
    subprocess.run(command(data, ckpt, reference), env=env, cwd=ROOT, check=True)

    with CacheReader(target) as a, CacheReader(os.path.join(reference, "shapes.h5")) as b:
        assert a.n_samples == b.n_samples == 48
        assert list(a.read_all("paths")) == list(b.read_all("paths"))
        for score in ("gaia_z", "gaia_a", "gradnorm"):
            np.testing.assert_array_equal(compute_score(a, score), compute_score(b, score))
