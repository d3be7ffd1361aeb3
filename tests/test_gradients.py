"""Batched per-sample gradients equal one backward pass per sample at batch size 1."""
import numpy as np
import pytest
import torch

from gradood.extract.models import build_model
from gradood.extract.objectives import objective_value
from bench.helpers import extract_tensor, randomize_norms
from gradood.store.reader import CacheReader
from gradood.store.schema import stat_path

LAYERS = ["bn1", "layer2.0.shortcut.1", "layer3.1.bn2", "layer4"]
OBJECTIVES = ["max_logit", "log_softmax_sum", "feature_sum"]


def per_sample_grads(model, x, layers, objective):
    """d objective / d output of each layer, one sample at a time, by torch.autograd.grad."""
    model = model.eval().requires_grad_(False)
    out = {l: [] for l in layers}
    for i in range(len(x)):
        captured = {}
        handles = [model.get_submodule(l).register_forward_hook(
            lambda m, a, o, l=l: captured.__setitem__(l, o)) for l in layers]
        handles.append(model.get_submodule(model.head_name).register_forward_pre_hook(
            lambda m, a: captured.__setitem__("x", a[0])))
        inp = x[i:i + 1].clone().requires_grad_(True)
        logits = model(inp)
        grads = torch.autograd.grad(objective_value(objective, logits, captured["x"]),
                                    [captured[l] for l in layers])
        for h in handles:
            h.remove()
        for l, g in zip(layers, grads):
            out[l].append(g[0].numpy())
    return {l: np.stack(v) for l, v in out.items()}


def test_batched_gradients_equal_batch_size_one(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    x = torch.randn(5, 3, 32, 32)
    path = str(tmp_path / "raw.h5")
    extract_tensor(model, "resnet18", x, path, ["gaia_a", "gaia_z"], hooks=LAYERS,
                   policies={l: "raw" for l in LAYERS}, batch_size=5)
    with CacheReader(path) as r:
        for objective in OBJECTIVES:
            expected = per_sample_grads(model, x, LAYERS, objective)
            for layer in LAYERS:
                got = r.read(stat_path(layer, objective, "map"))
                assert got.shape == expected[layer].shape
                scale = np.abs(expected[layer]).max()
                assert scale > 0
                # float32: the convolution backward sums in another order at batch size 5
                # than at 1 (oneDNN picks kernels by shape): entries near zero differ by
                # up to ~2e-6 of the layer's largest gradient on this CPU
                np.testing.assert_allclose(got, expected[layer], rtol=1e-5, atol=1e-5 * scale)
                np.testing.assert_array_equal(r.read(stat_path(layer, objective, "nonzero")),
                                              (expected[layer] != 0).sum(axis=(2, 3)))


def test_backward_starts_at_earliest_hooked_block(tmp_path):
    """With only layer3/4 hooked, nothing below layer3.0 is differentiated, and the
    shortcut BN of layer3.0 still receives its gradient."""
    from gradood.extract.hooks import graph_start
    model = build_model("resnet18", 10)
    assert graph_start(model, ["layer3.0.bn1", "layer3.0.shortcut.1", "layer4"]) == "layer3.0"
    assert graph_start(model, ["bn1", "layer1.0.bn1"]) == "bn1"
    seen = []
    model.conv1.register_full_backward_hook(lambda *a: seen.append("conv1"))
    model.layer2.register_full_backward_hook(lambda *a: seen.append("layer2"))
    path = str(tmp_path / "c.h5")
    extract_tensor(randomize_norms(model), "resnet18", torch.randn(2, 3, 32, 32), path, ["gaia_a"])
    assert seen == []
    with CacheReader(path) as r:
        g = r.read(stat_path("layer3.0.shortcut.1", "feature_sum", "mean"))
        assert np.abs(g).sum() > 0


@pytest.mark.parametrize("arch,policy", [("resnet18", "stats"), ("wrn_40_2", "raw")])
def test_truncated_backward_is_bit_identical_to_full_depth(tmp_path, arch, policy):
    """Each objective's backward stops at the layers it feeds; every stored array equals a
    run whose backward passes go down to the earliest hooked layer (WRN: in-place ReLUs)."""
    import h5py
    torch.manual_seed(0)
    model = randomize_norms(build_model(arch, 10))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    scores = ["gaia_a", "gaia_z", "nac", "odin"]
    params = {"nac": {"layers": ["avgpool", "layer3"] if arch == "resnet18" else ["avgpool", "block2"]}}
    paths = [extract_tensor(model, arch, x, str(tmp_path / f"{t}.h5"), scores, policies={"*": policy},
                            batch_size=4, params=params, truncate=t) for t in (True, False)]
    with h5py.File(paths[0]) as a, h5py.File(paths[1]) as b:
        names = []
        a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert len(names) > 50 and any("grad/feature_sum" in n for n in names)
        for n in names:
            np.testing.assert_array_equal(a[n][...], b[n][...], err_msg=n)


def test_nac_alone_records_no_backward_pass(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet18", 10))
    path = extract_tensor(model, "resnet18", torch.randn(4, 3, 32, 32), str(tmp_path / "n.h5"), ["nac"])
    with CacheReader(path) as r:
        assert r.attrs["objectives"] == [] and r.attrs["layers"] == []
