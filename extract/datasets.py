"""Benchmarks, dataset layouts and the authors' evaluation transforms.

All sets live under one data root, laid out as the seed READMEs describe. Every item is
``(image tensor, label, index, reason)``; ``reason`` is ``""`` for a readable image and
the decoder's error message for an unreadable one when ``skip_bad`` is on (the tensor is
then zeros and the label -1).
"""
import os

import torch
from PIL import Image
from torchvision import datasets as tvd
from torchvision import transforms as T

from store.benchmarks import WHERE_TO_GET

# Evaluation transforms. CIFAR constants from GAIA's data/datasets.py; BiT ImageNet from
# GradNorm's test_ood.py (Resize 480x480, Normalize 0.5/0.5); torchvision models use their
# standard ImageNet evaluation transform.
PREPROCESS = {
    "cifar10": [("CenterCrop", 32), ("ToTensor",), ("Normalize", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))],
    "cifar100": [("CenterCrop", 32), ("ToTensor",), ("Normalize", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))],
    "imagenet_bit": [("Resize", (480, 480)), ("ToTensor",), ("Normalize", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
    "imagenet_tv": [("Resize", 256), ("CenterCrop", 224), ("ToTensor",), ("Normalize", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))],
    "demo": [("CenterCrop", 32), ("ToTensor",), ("Normalize", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
}


def build_transform(name, image_size=None):
    """Transform for preprocessing ``name``; returns (transform, JSON-able description).

    image_size overrides the crop/resize size (for small test models).
    """
    if name not in PREPROCESS:
        raise ValueError(f"unknown preprocessing {name!r}; choose one of: {', '.join(PREPROCESS)}")
    steps = []
    for step in PREPROCESS[name]:
        if image_size and step[0] in ("CenterCrop", "Resize"):
            step = (step[0], (image_size, image_size) if isinstance(step[1], tuple) else image_size)
        steps.append(step)
    ops = []
    for kind, *args in steps:
        ops.append(getattr(T, kind)(*args))
    description = {"name": name, "steps": [[kind, *args] for kind, *args in steps]}
    return T.Compose(ops), description


def expected_layout(kind, rel):
    if kind == "cifar10":
        return "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"
    if kind == "cifar100":
        return "cifar-100-python/{train,test,meta}"
    if kind == "svhn":
        return "test_32x32.mat"
    return f"{rel}/<class folder>/<image files>  (torchvision ImageFolder)"


class ImageSet(torch.utils.data.Dataset):
    """Wraps a torchvision dataset: items ``(x, label, index, reason)``; keeps ``paths``."""

    def __init__(self, base, paths, skip_bad=False, image_shape=None):
        self.base, self.paths, self.skip_bad = base, paths, skip_bad
        self.image_shape = image_shape

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            x, y = self.base[i]
            return x, y, i, ""
        except Exception as err:  # any decoder error: PIL, truncated files, OS errors
            if not self.skip_bad:
                raise RuntimeError(f"cannot read image {self.paths[i]}: {err}. Remove or "
                                   "replace it, or pass --skip-bad to record it as skipped") from err
            return torch.zeros(self.image_shape), -1, i, f"{type(err).__name__}: {err}"[:300]


def _probe_shape(transform):
    return tuple(transform(Image.new("RGB", (500, 500))).shape)


def open_dataset(data_root, kind, rel, transform, name, skip_bad=False):
    """Dataset ``name`` of kind ``folder``/``cifar10``/``cifar100``/``svhn`` as an ImageSet.

    Raises FileNotFoundError with the expected layout and where to get the files.
    """
    path = os.path.join(data_root, rel) if kind == "folder" else data_root
    try:
        if kind == "folder":
            base = tvd.ImageFolder(path, transform=transform, allow_empty=False)
            paths = [p for p, _ in base.samples]
        elif kind in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
            base = cls(path, train=(rel == "train"), transform=transform, download=False)
            paths = [f"{kind}:{rel}:{i}" for i in range(len(base))]
        elif kind == "svhn":
            base = tvd.SVHN(path, split=rel, transform=transform, download=False)
            paths = [f"svhn:{rel}:{i}" for i in range(len(base))]
        else:
            raise ValueError(kind)
    except (FileNotFoundError, RuntimeError) as err:
        raise FileNotFoundError(
            f"dataset {name!r} not found under data root {data_root!r} ({err}).\n"
            f"Expected layout: {data_root}/{expected_layout(kind, rel)}\n{WHERE_TO_GET}") from None
    return ImageSet(base, paths, skip_bad, _probe_shape(transform))


def balanced_subset(labels, limit, seed=0):
    """Indices of at most ``limit`` samples with (nearly) equal counts per class, sorted.

    labels: sequence of ints. Classes are filled round-robin from a seeded permutation,
    so the same (labels, limit, seed) always gives the same subset.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(labels))
    pools = {int(c): (labels == c).nonzero().flatten()[torch.randperm(int((labels == c).sum()), generator=g)].tolist()
             for c in torch.unique(labels)}
    chosen = []
    while len(chosen) < limit and any(pools.values()):
        for c in sorted(pools):
            if pools[c] and len(chosen) < limit:
                chosen.append(pools[c].pop(0))
    return sorted(chosen)


def dataset_labels(ds):
    """Integer labels of an ImageSet's base dataset, without decoding images."""
    base = ds.base
    for attr in ("targets", "labels"):
        if hasattr(base, attr):
            return list(getattr(base, attr))
    raise ValueError("dataset has no labels")
