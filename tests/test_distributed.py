"""Sharded extraction under torchrun (2 gloo processes on CPU) equals a single-process run."""
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

from gradood.extract.distributed import Shard, grid_batches
from gradood.pipeline import cli
from gradood.store.writer import list_parts, missing_intervals, parts_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, BATCH = 26, 3          # 9 batches, the last one short: rank 0 gets 4 (rows 0-12), rank 1 gets 5


@pytest.mark.parametrize("n,batch,world", [(42, 4, 2), (10, 3, 4), (5, 8, 3), (100, 7, 6)])
def test_row_ranges_tile_the_batch_grid(n, batch, world):
    ranges = [Shard(r, world).row_range(n, batch) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a, b), (c, d) in zip(ranges, ranges[1:]):
        assert b == c and a <= b
    assert all(a % batch == 0 for a, b in ranges if a < b)
    sizes = [-(-(b - a) // batch) for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_resume_fills_only_missing_rows_on_the_global_grid():
    parts = [(0, 4, "p"), (8, 12, "p"), (20, 22, "p")]
    assert missing_intervals(parts, 0, 22) == [(4, 8), (12, 20)]
    assert missing_intervals(parts, 10, 30) == [(12, 20), (22, 30)]
    # a part written with another batch size: the next batch stops at the grid line
    assert grid_batches([(6, 17)], 4) == [(6, 8), (8, 12), (12, 16), (16, 17)]


def _arguments(data, ckpt, cache):
    return ["extract", "--benchmark", "demo", "--data-root", data, "--checkpoint", ckpt, "--cache-dir", cache,
            "--dataset", "shapes", "--limit", str(N), "--batch-size", str(BATCH), "--quiet", "--device", "cpu",
            "--score", "gaia_z,gaia_a,gradnorm,msp,odin"]


def _command(data, ckpt, cache, nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "pipeline.py", *_arguments(data, ckpt, cache)]


def _worker_with_rank(parent_pid, rank):
    """Pid of the torchrun worker child of ``parent_pid`` whose environment has RANK=rank."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if env.get(b"RANK") == str(rank).encode():
            return int(pid)
    return None


def test_two_gloo_ranks_killed_and_resumed_equal_single_process(tmp_path, demo_files):
    data, ckpt = demo_files          # read only: the killed and the whole run extract the same images
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}

    sharded = str(tmp_path / "sharded")
    target = os.path.join(sharded, "shapes.h5")
    proc = subprocess.Popen(_command(data, ckpt, sharded, 2), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank1_rows = Shard(1, 2).row_range(N, BATCH)
    deadline, victim = time.time() + 180, None
    while time.time() < deadline and proc.poll() is None:
        mine = [p for p in list_parts(parts_dir(target)) if p[0] >= rank1_rows[0]]
        if mine:
            victim = _worker_with_rank(proc.pid, 1)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.02)
    first_output = proc.communicate(timeout=120)[0]
    assert victim is not None, f"rank 1 never wrote a part:\n{first_output}"
    assert proc.returncode != 0, "torchrun must fail when a rank is killed"
    assert not os.path.exists(target)
    left = missing_intervals(list_parts(parts_dir(target)), *rank1_rows)
    assert left and left[-1][1] == N, "rank 1 finished before it could be killed"

    resumed = subprocess.run(_command(data, ckpt, sharded, 2), env=env, cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    done_by_rank1 = rank1_rows[1] - rank1_rows[0] - sum(b - a for a, b in left)
    assert f"rank 1 of 2 extracts rows {rank1_rows[0]}-{rank1_rows[1]} ({done_by_rank1} already done)" in resumed.stdout
    assert not os.path.exists(parts_dir(target))

    single = str(tmp_path / "single")            # the same command without torchrun, in this process,
    threads = torch.get_num_threads()            # on one thread as the ranks (OMP_NUM_THREADS=1)
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(cli, _arguments(data, ckpt, single))
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    with h5py.File(target, "r") as a, h5py.File(os.path.join(single, "shapes.h5"), "r") as b:
        assert a.attrs["complete"] and a.attrs["world_size"] == 2 and b.attrs["world_size"] == 1
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
        names = []
        b.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert "odin/T1000_eps0.0014/logits" in names and len(names) > 10
        for name in names:       # every stored array, bit for bit
            assert a[name].shape == b[name].shape, name
            np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
