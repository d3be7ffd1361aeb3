"""Sharded extraction across ``torch.distributed`` ranks, as launched by ``torchrun``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank extracts one
contiguous range of whole batches of each dataset. Batches lie on one global grid, rows
``[k * batch_size, (k + 1) * batch_size)``, whatever the number of ranks, so each image
is computed in exactly the batch it would have in a single-process run and the cache is
bit-for-bit the same. Ranks write their rows as part files into the same
``<cache>.h5.parts/`` folder (store.writer): on several nodes that folder must be on a
shared file system. When every rank has finished its range, rank 0 streams the parts,
in dataset order, into the one final cache; the other ranks wait at a barrier until the
file exists. A rank that dies loses at most the batch it was computing: rerunning the
same command (with any number of ranks) extracts only the rows no part holds yet.

Backends: NCCL when the ranks use CUDA devices (rank ``i`` of a node takes
``cuda:<LOCAL_RANK>``), gloo on CPU.
"""
import datetime
import os

import torch
import torch.distributed as dist

# A resumed rank may wait at the barrier while another still extracts most of its range.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


class Shard:
    """This process's place in a run: ``rank`` of ``world_size``; ``local_rank`` on its node."""

    def __init__(self, rank=0, world_size=1, local_rank=0, device=None):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device

    @property
    def is_main(self):
        """True on the rank that prepares the parts folder, assembles and prints."""
        return self.rank == 0

    def barrier(self):
        """Wait for every rank (no-op in a single process)."""
        if self.world_size > 1:
            if self.device is not None and self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def row_range(self, n_rows, batch_size):
        """``(start, stop)`` rows of this rank: a contiguous run of whole grid batches.

        The ``ceil(n_rows / batch_size)`` batches are split as evenly as integers allow
        (rank r gets batches ``[B r / W, B (r + 1) / W)``); the last batch may be short.
        """
        n_batches = -(-n_rows // batch_size)
        first = n_batches * self.rank // self.world_size
        last = n_batches * (self.rank + 1) // self.world_size
        return min(n_rows, first * batch_size), min(n_rows, last * batch_size)

    def close(self):
        """Leave the process group (after a final barrier)."""
        if self.world_size > 1 and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()


def init_shard(device_name):
    """Join the process group when launched by ``torchrun``; returns ``(Shard, device name)``.

    device_name: ``auto``/``cpu``/``cuda``/``cuda:N``. Under torchrun ``auto`` and
    ``cuda`` become ``cuda:<LOCAL_RANK>``. Without torchrun: ``(Shard(), device_name)``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Shard(), device_name
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda":
        device_name = f"cuda:{local_rank}"
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Shard(rank, world_size, local_rank, device), device_name


def grid_batches(intervals, batch_size):
    """Row ranges ``[(start, stop)]`` covering ``intervals`` and cut at multiples of ``batch_size``."""
    out = []
    for lo, hi in intervals:
        start = lo
        while start < hi:
            stop = min(hi, (start // batch_size + 1) * batch_size)
            out.append((start, stop))
            start = stop
    return out
