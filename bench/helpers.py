"""Shared helpers: small models with non-trivial norm layers, in-memory extraction."""
import os

import numpy as np
import torch
from click.testing import CliRunner

from gradood.analyze.fitting import fit_estimator, fitted_state, restore, score_cache
from gradood.analyze.registry import entry, requirements
from gradood.extract import ExtractConfig, Provenance
from gradood.extract.runner import extract_to_cache
from gradood.extract.datasets import ImageSet
from gradood.pipeline import cli
from gradood.store.reader import CacheReader


def run_cli(args):
    """``(exit code, output)`` of the command line ``args`` run in this process."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output


def demo_workspace(base):
    """The demo images under ``base/data`` and a random demo-layout checkpoint
    ``base/model.pt`` (CIFAR ResNet-18 with random norm layers); returns (data, ckpt)."""
    from gradood.extract.demo_data import build_demo_data
    from gradood.extract.models import build_model
    data = build_demo_data(str(base / "data"))
    ckpt = str(base / "model.pt")
    torch.manual_seed(0)
    torch.save(randomize_norms(build_model("resnet18", 10)).state_dict(), ckpt)
    return data, ckpt


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
                   batch_size=4, name="set", labels=None, odin_pairs=((1000.0, 0.0014),), maha=None,
                   params=None, truncate=True):
    """Extract ``images`` with ``model`` into ``cache_file`` for ``scores``; returns the path."""
    needs, passes = requirements(scores, params)
    if maha:
        passes = (*passes, "mahalanobis")
    policies = dict(policies or {})
    config = ExtractConfig(arch=arch, needs=needs, passes=passes, hooks=tuple(hooks),
                           policy=policies.pop("*", "scores"), store=policies, odin=tuple(odin_pairs),
                           odin_std=(0.5, 0.5, 0.5), maha=maha, batch_size=batch_size, device="cpu",
                           progress=False, truncate_backward=truncate)
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    return extract_to_cache(model, image_set(images, labels), cache_file, config,
                            Provenance(dataset=name, checkpoint_sha256="test", weights_sha256="test"))


def fit_score(reader, score, **params):
    """A fitted estimator of ``score`` on the open cache ``reader``."""
    return fit_estimator(reader, score, params)


def compute_score(reader, score, fitted=None, **params):
    """Scores (N,) of an open cache; ``fitted``: an estimator from ``fit_score``."""
    if fitted is None:
        est = entry(score).make(params)
    elif params and hasattr(fitted, "__dict__"):     # the same fit, other scoring parameters
        est = restore(score, params, fitted_state(fitted))
    else:
        est = fitted
    return score_cache(reader, score, est, params)


def compute(path, score, train=None, **params):
    """Scores (N,) of the cache at ``path``; fitted scores are fitted on the cache ``train``."""
    with CacheReader(path) as reader:
        est = entry(score).make(params)
        if entry(score).fitted:
            with CacheReader(train or path) as t:
                est = fit_estimator(t, score, params)
        return score_cache(reader, score, est, params)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
