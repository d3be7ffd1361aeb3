"""Gradient tracking: batched per-sample norms equal Open_OOD's batch-size-1 loop, and the
cache-side scores read them as the release does."""
import copy

import numpy as np
import torch
import torch.nn as nn

from bench.helpers import compute_score
from gradood.extract.models import build_model
from gradood.extract.tracking import per_sample_grad_norms, tracked_parameters
from bench.helpers import extract_tensor, randomize_norms, rel_err
from gradood.store.reader import CacheReader


def open_ood_norms(model, images):
    """The release's procedure: per sample (batch 1), per class label, CE backward, the L2
    norm of every parameter's gradient whose name holds neither 'bn' nor 'bias'."""
    model = copy.deepcopy(model).eval().requires_grad_(True)
    names = [n for n, _ in model.named_parameters() if "bn" not in n and "bias" not in n]
    out = np.zeros((len(images), 0, len(names)))
    rows = []
    for x in images:
        per_class = []
        for k in range(model(x[None]).shape[1]):
            model.zero_grad()
            loss = nn.CrossEntropyLoss()(model(x[None]), torch.tensor([k]))
            loss.backward()
            params = dict(model.named_parameters())
            per_class.append([params[n].grad.norm(2).item() for n in names])
        rows.append(per_class)
    return names, np.array(rows)


class Strided(nn.Module):
    """Padding, stride, dilation and a Linear head: the conv factorisations' corner cases."""
    head_name = "fc"

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 40, 3, stride=1, padding=2, dilation=2, bias=False)
        self.fc = nn.Linear(40, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_batched_norms_equal_batch_one_loop():
    torch.manual_seed(0)
    for model, size in ((randomize_norms(build_model("resnet18", 10)), 32), (Strided().eval(), 9)):
        images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
        names, expected = open_ood_norms(model, images)
        frozen = copy.deepcopy(model).requires_grad_(False)
        assert tracked_parameters(frozen) == names
        got = per_sample_grad_norms(frozen, images, names).numpy()
        assert rel_err(got, expected) <= 1e-4
        assert np.ptp(got[:, :, -1]) > 0                 # differs across samples and labels


def test_tracking_scores_from_cache():
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        path = extract_tensor(model, "resnet18", images, os.path.join(d, "s.h5"), ["tracking"], batch_size=2)
        _, norms = open_ood_norms(model, images)
        with CacheReader(path) as r:
            for reduce in ("min", "max", "mean"):
                kept = getattr(norms, reduce)(axis=1)
                assert rel_err(compute_score(r, "tracking", reduce=reduce), -np.sqrt((kept ** 2).sum(1))) <= 1e-4
                assert rel_err(compute_score(r, "tracking", reduce=reduce, tensor=3), -kept[:, 3]) <= 1e-4
            name = r.attrs["tracked_parameters"][0]
            assert rel_err(compute_score(r, "tracking", tensor=name), -norms.min(axis=1)[:, 0]) <= 1e-4
