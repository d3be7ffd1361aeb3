"""kill -9 during extraction, rerun the same command: the cache equals an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from click.testing import CliRunner

from bench.helpers import compute_score, randomize_norms
from gradood.extract.models import build_model
from gradood.pipeline import cli
from gradood.store.reader import CacheReader
from gradood.store.writer import list_parts, parts_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arguments(data, ckpt, cache):
    """The extraction both runs make: 24 shapes, 12 parts of 2 rows."""
    return ["extract", "--benchmark", "demo", "--data-root", data, "--checkpoint", ckpt, "--cache-dir", cache,
            "--dataset", "shapes", "--limit", "24", "--batch-size", "2", "--quiet", "--score", "gaia_z",
            "--score", "gaia_a"]


def rerun(args):
    """The same command in this process (the killed one was a real process)."""
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output


def test_kill_9_then_resume_matches_uninterrupted(tmp_path, demo_files):
    data, ckpt = demo_files          # read only: the killed and the whole run extract the same images
    env = {**os.environ, "PYTHONPATH": ROOT}

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pipeline.py"), *arguments(data, ckpt, killed)],
                            env=env, cwd=ROOT)
    target = os.path.join(killed, "shapes.h5")
    deadline = time.time() + 120
    while len(list_parts(parts_dir(target))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(target), "the run finished before it could be killed"
    done_before = len(list_parts(parts_dir(target)))
    assert 0 < done_before < 12

    rerun(arguments(data, ckpt, killed))
    reference = str(tmp_path / "whole")
    rerun(arguments(data, ckpt, reference))

    with CacheReader(target) as a, CacheReader(os.path.join(reference, "shapes.h5")) as b:
        assert a.n_samples == b.n_samples == 24
        assert list(a.read_all("paths")) == list(b.read_all("paths"))
        for score in ("gaia_z", "gaia_a", "gradnorm"):
            np.testing.assert_array_equal(compute_score(a, score), compute_score(b, score))


def test_disk_full_leaves_a_resumable_cache(tmp_path, monkeypatch):
    """A write error (ENOSPC) mid-run: clear message, no final file, rerun resumes to the same cache."""
    import errno

    import pytest

    from bench.helpers import extract_tensor
    from gradood.store.schema import CacheError
    import gradood.store.writer as W

    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = extract_tensor(model, "resnet18", images, str(tmp_path / "ref" / "s.h5"), ["gaia_z"], batch_size=3)
    target = str(tmp_path / "run" / "s.h5")
    original = W._fsync_file
    calls = []

    def failing(path):   # the third part file hits a full disk
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path)

    monkeypatch.setattr(W, "_fsync_file", failing)
    with pytest.raises(CacheError, match="No space left on device.*rerun the same command to resume"):
        extract_tensor(model, "resnet18", images, target, ["gaia_z"], batch_size=3)
    assert not os.path.exists(target)
    assert [p[:2] for p in list_parts(parts_dir(target))] == [(0, 3), (3, 6)]
    assert not [f for f in os.listdir(parts_dir(target)) if f.endswith(".tmp")]
    monkeypatch.setattr(W, "_fsync_file", original)
    extract_tensor(model, "resnet18", images, target, ["gaia_z"], batch_size=3)
    with CacheReader(ref) as a, CacheReader(target) as b:
        assert b.attrs["complete"]
        np.testing.assert_array_equal(compute_score(a, "gaia_z"), compute_score(b, "gaia_z"))
