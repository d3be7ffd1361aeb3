"""Shared helpers: small models with non-trivial norm layers, in-memory extraction."""
import os

import numpy as np
import torch

from extract.datasets import ImageSet
from extract.runner import ExtractionPlan, resolve_hooks, run_extraction


def randomize_norms(model, seed=0):
    """Give every norm layer random affine parameters and running statistics (in place)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


class ArraySet(torch.utils.data.Dataset):
    def __init__(self, images, labels=None):
        self.images = images
        self.labels = labels if labels is not None else torch.zeros(len(images), dtype=torch.long)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def image_set(images, labels=None):
    """ImageSet over a (N, 3, H, W) tensor, paths ``mem:<i>``."""
    return ImageSet(ArraySet(images, labels), [f"mem:{i}" for i in range(len(images))],
                    image_shape=tuple(images.shape[1:]))


def extract_tensor(model, arch, images, cache_file, scores, hooks=(), policies=None,
                   batch_size=4, name="set", labels=None, odin_pairs=((1000.0, 0.0014),), maha=None):
    """Extract ``images`` with ``model`` into ``cache_file``; returns the path."""
    model = model.eval().requires_grad_(False)
    hook_sets = resolve_hooks(model, arch, hooks, scores)
    plan = ExtractionPlan(model, arch, hook_sets, scores, policies or {}, tuple(images.shape[1:]),
                          torch.device("cpu"), odin_pairs, maha)
    meta = {"checkpoint": "in-memory", "checkpoint_sha256": "test", "preprocess": {"name": "none"},
            "dataset": name, "dataset_root": "", "split": "test"}
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    return run_extraction(model, arch, image_set(images, labels), plan, cache_file, meta,
                          batch_size, torch.device("cpu"), progress=False)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
