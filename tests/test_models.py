"""Any classifier goes in: torchvision and timm models, a user's own file, the seeds' layouts.

For each model (random weights, tiny inputs) every default score the model serves is
extracted, then per sample: logits and features equal the model's own forward; GradNorm
equals a batch-size-1 autograd loop on the head weight; the activation and max-logit
gradient statistics of chosen modules equal direct hooks on a clone of the module's output,
reduced over the positions of the layout the test states (not the one traced).
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from bench import authors_reference as ref
from gradood.analyze.registry import default_scores, requirements
from gradood.extract.adapters import adapter_for
from gradood.extract.adapters.serves import unserved
from gradood.extract.models import build_model
from bench.helpers import compute_score, extract_tensor, rel_err
from gradood.store.reader import CacheReader
from gradood.store.schema import stat_path

timm = pytest.importorskip("timm")
import torchvision  # noqa: E402

USER_MODEL = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    """In-place ReLUs right after hooked modules, a grouped convolution, a LayerNorm on the
    pooled vector and a Dropout + Linear head."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(16))
        self.norm = nn.LayerNorm(16)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, num_classes))

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        F.relu(x, inplace=True)
        x = self.block(x)
        torch.relu_(x)
        return self.classifier(self.norm(x.mean(dim=(2, 3))))


def build(num_classes):
    return Net(num_classes)
'''


def randomize(model, seed=0):
    """Random affine parameters and running statistics for every norm layer; random
    values for weight matrices that start at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():        # torchvision's ViT starts with a zero head
            if p.dim() > 1 and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def small_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5)


def small_swin():
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                              window_size=[4, 4], num_classes=5)


def tiny_bit():
    from gradood.extract.models.bit_resnetv2 import ResNetV2
    return ResNetV2([1, 1, 1, 1], 1, 5, groups=4, base=8)


def tv(name):
    return lambda: build_model(f"torchvision:{name}", 5)


# label, factory, image side, {module: the layout of its output, as the test knows it}
MODELS = [
    ("torchvision:densenet121", tv("densenet121"), 64,
     {"features.denseblock1.denselayer1.norm1": "NCHW", "features.norm5": "NCHW"}),
    ("VisionTransformer", small_vit, 32,
     {"encoder.layers.encoder_layer_0.ln_1": "NTC", "encoder": "NTC"}),
    ("SwinTransformer", small_swin, 32, {"features.1.0.norm1": "NHWC", "norm": "NHWC"}),
    ("torchvision:convnext_tiny", tv("convnext_tiny"), 64,
     {"features.1.0.block.2": "NHWC", "features": "NCHW"}),
    ("torchvision:efficientnet_b0", tv("efficientnet_b0"), 64, {"features.0.1": "NCHW", "features": "NCHW"}),
    ("torchvision:mobilenet_v3_small", tv("mobilenet_v3_small"), 64, {"features.0.1": "NCHW", "features": "NCHW"}),
    ("torchvision:regnet_y_400mf", tv("regnet_y_400mf"), 64, {"stem.1": "NCHW", "trunk_output": "NCHW"}),
    ("torchvision:resnet34", tv("resnet34"), 64, {"layer1.0.bn1": "NCHW", "layer4": "NCHW"}),
    ("timm:resnet18", lambda: build_model("timm:resnet18", 5), 64, {"bn1": "NCHW", "layer4": "NCHW"}),
    ("timm ViT", lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5,
                                           img_size=32, patch_size=8), 32,
     {"blocks.0.norm1": "NTC", "norm": "NTC"}),
    ("resnet20", lambda: build_model("resnet20", 5), 32, {"layer1.0.bn2": "NCHW", "layer3": "NCHW"}),
    ("densenet_bc_100", lambda: build_model("densenet_bc_100", 5), 32, {"block1.layer.0.bn1": "NCHW", "bn1": "NCHW"}),
    ("wrn_28_10", lambda: build_model("wrn_28_10", 5), 32, {"block1.layer.0.bn1": "NCHW", "relu": "NCHW"}),
    ("BiT", tiny_bit, 32, {"body.block4.unit01.gn1": "NCHW", "before_head.relu": "NCHW"}),
    # 299 px in its release; 80 px is above its smallest input (75), aux logits off in eval
    ("torchvision:inception_v3", tv("inception_v3"), 80, {"Conv2d_1a_3x3.bn": "NCHW", "Mixed_7c": "NCHW"}),
    # maxvit_t's classes at a tiny width: 112 px keeps every stage's grid a multiple of the 7x7 partition
    ("MaxVit", lambda: torchvision.models.MaxVit(
        input_size=(112, 112), stem_channels=8, partition_size=7, block_channels=[8, 16], block_layers=[1, 1],
        head_dim=4, stochastic_depth_prob=0.0, num_classes=5), 112, {"stem.0.1": "NCHW", "blocks.1": "NCHW"}),
    ("vit_b_32's patching", lambda: torchvision.models.VisionTransformer(
        image_size=64, patch_size=32, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5), 64,
     {"encoder.layers.encoder_layer_0.ln_1": "NTC", "encoder": "NTC"}),
    ("timm:mobilevit_xxs", lambda: build_model("timm:mobilevit_xxs", 5), 64, {"stem": "NCHW", "final_conv": "NCHW"}),
    ("timm:regnetx_002", lambda: build_model("timm:regnetx_002", 5), 64, {"stem": "NCHW", "final_conv": "NCHW"}),
    ("timm:resnetv2_50x1_bit", lambda: build_model("timm:resnetv2_50x1_bit", 5), 64, {"stem": "NCHW", "norm": "NCHW"}),
]


def served_defaults(adapter):
    """Default scores the model serves (by the adapter), with the reasons for the others."""
    served, refused = [], {}
    for name in default_scores():
        reasons = unserved(adapter, *requirements([name]))
        (refused.__setitem__(name, reasons) if reasons else served.append(name))
    return served, refused


def per_sample_reference(model, x, layouts, feature=None):
    """Batch-size-1 loop: logits, features, and per module of ``layouts`` the activation
    (mean, abs_max) and max-logit gradient (mean, nonzero) per channel, taken from hooks
    that hand the rest of the network a clone of the module's output. The features are the
    head's input, or with ``feature = (module, "input" | "output", pooled)`` that module's
    input or output, averaged over positions when ``pooled``."""
    modules = dict(model.named_modules())
    name, side, pooled = feature or (None, "input", False)
    source = modules[name] if name else ref.head_of(model)
    out = {"logits": [], "features": [], "layers": {}}
    for name in layouts:
        out["layers"][name] = {"act_mean": [], "act_abs_max": [], "grad_mean": [], "grad_abs_max": [], "grad_nonzero": []}

    def per_channel(t, layout):
        t = t[0]
        if layout == "NHWC":
            t = t.permute(2, 0, 1)
        elif layout == "NTC":
            t = t.transpose(0, 1)
        return t.reshape(t.shape[0], -1).double()

    for i in range(len(x)):
        captured, handles = {}, []
        for name in layouts:
            def hook(m, a, o, name=name):
                captured[name] = o
                return o.clone()
            handles.append(modules[name].register_forward_hook(hook))
        if side == "input":
            handles.append(source.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0])))
        else:
            handles.append(source.register_forward_hook(lambda m, a, o: captured.__setitem__("x", o)))
        try:
            with torch.enable_grad():
                inp = x[i:i + 1].clone().requires_grad_(True)
                z = model(inp)
                grads = torch.autograd.grad(z.max(dim=1).values.sum(), [captured[n] for n in layouts])
        finally:
            for h in handles:
                h.remove()
        out["logits"].append(z.detach()[0].numpy())
        f = captured["x"].detach()
        out["features"].append((f.flatten(2).mean(2) if pooled else f.flatten(1))[0].numpy())
        for (name, layout), g in zip(layouts.items(), grads):
            a, g = per_channel(captured[name].detach(), layout), per_channel(g, layout)
            rec = out["layers"][name]
            rec["act_mean"].append(a.mean(1).numpy())
            rec["act_abs_max"].append(a.abs().amax(1).numpy())
            rec["grad_mean"].append(g.mean(1).numpy())
            rec["grad_abs_max"].append(g.abs().amax(1).numpy())
            rec["grad_nonzero"].append((g != 0).sum(1).numpy())
    return {"logits": np.stack(out["logits"]), "features": np.stack(out["features"]),
            "layers": {n: {k: np.stack(v) for k, v in rec.items()} for n, rec in out["layers"].items()}}


def close(got, want, rtol=2e-5, scale=None):
    """``got`` equals ``want`` to ``rtol`` of ``scale`` (default: the largest |want|)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max() if scale is None else scale, 1e-30)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def check_model(model, side, layouts, tmp_path, arch="test", channels=3):
    torch.manual_seed(0)
    model = randomize(model).requires_grad_(False)
    x = torch.randn(3, channels, side, side, generator=torch.Generator().manual_seed(1))
    adapter = adapter_for(model, (channels, side, side))
    served, refused = served_defaults(adapter)
    assert {"gaia_z", "gradnorm", "msp", "knn", "nac"} <= set(served), refused
    path = str(tmp_path / "cache.h5")
    extract_tensor(model, arch, x, path, served, hooks=list(layouts),
                   policies={name: "stats" for name in layouts}, batch_size=3)
    want = per_sample_reference(model, x, layouts)
    with torch.no_grad():
        logits = model(x).numpy()
    with CacheReader(path) as r:
        assert r.attrs["head"] == adapter.head_name
        close(r.read_all("logits"), logits)
        close(r.read_all("logits"), want["logits"])
        close(r.read_all("features"), want["features"])
        assert rel_err(compute_score(r, "gradnorm"), ref.gradnorm(model, x)) < 1e-4
        for name, layout in layouts.items():
            assert r.attrs["layer_layouts"][name] == layout
            rec = want["layers"][name]
            close(r.read(stat_path(name, "act", "mean")), rec["act_mean"])
            close(r.read(stat_path(name, "act", "abs_max")), rec["act_abs_max"])
            # a channel's gradient mean sums terms of both signs that cancel to near zero: compared
            # on the layer's scale (its largest |gradient| entry), not on the cancelled result.
            # The backward's float32 rounding differs between runs of one process (DenseNet-121
            # after tests/test_no_silent.py: 6 of 192 near-zero means off by up to 5.6e-8, 2e-4 of
            # the cancelled values' scale, within 1e-4 of the layer's)
            close(r.read(stat_path(name, "max_logit", "mean")), rec["grad_mean"], rtol=1e-4,
                  scale=rec["grad_abs_max"].max())
            np.testing.assert_array_equal(r.read(stat_path(name, "max_logit", "nonzero")), rec["grad_nonzero"])
        assert np.all(np.isfinite(compute_score(r, "gaia_z")))
    return served, refused


@pytest.mark.parametrize("label,factory,side,layouts", MODELS, ids=[m[0] for m in MODELS])
def test_model_extracts_what_its_forward_computes(label, factory, side, layouts, tmp_path):
    check_model(factory(), side, layouts, tmp_path, arch=label)


def test_user_model_file(tmp_path):
    """--model-file: in-place ReLUs after the hooked BNs, Dropout + Linear head; the file's
    hash is recorded; tracking norms (grouped conv, BN, LayerNorm, Linear) equal a
    batch-size-1 loop."""
    from gradood.extract import ExtractConfig
    from gradood.extract.cli_support import extract_command
    from gradood.extract.datasets import build_transform  # noqa: F401  (torchvision transforms)
    from gradood.extract.tracking import per_sample_grad_norms, tracked_parameters
    source = tmp_path / "mymodel.py"
    source.write_text(USER_MODEL)
    model = build_model(None, 5, f"{source}:build")
    served, _ = check_model(model, 16, {"bn1": "NCHW", "block.1": "NCHW", "block": "NCHW"}, tmp_path)
    model = randomize(model).requires_grad_(False)
    names = tracked_parameters(model)
    assert names == ["conv1.weight", "block.0.weight", "block.1.weight", "norm.weight", "classifier.1.weight"]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    got = per_sample_grad_norms(model, x, names).numpy()
    params = dict(model.named_parameters())
    for i in range(3):
        for k in range(5):
            with torch.enable_grad():
                for p in params.values():
                    p.requires_grad_(True)
                loss = nn.functional.cross_entropy(model(x[i:i + 1]), torch.tensor([k]))
                grads = torch.autograd.grad(loss, [params[n] for n in names])
                model.requires_grad_(False)
            close(got[i, k], [g.norm().item() for g in grads], rtol=1e-5)
    # the CLI records the file and its hash
    from PIL import Image
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    for j in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * j, np.uint8)).save(folder / f"{j}.png")
    ckpt = tmp_path / "w.pt"
    torch.save(model.state_dict(), ckpt)
    needs, passes = requirements(["msp", "gaia_z"])
    extract_command(ExtractConfig(needs=needs, passes=passes, datasets=(f"mine={tmp_path / 'imgs'}",),
                                  model_file=f"{source}:build", checkpoint=str(ckpt), num_classes=5,
                                  preprocess="totensor", cache_dir=str(tmp_path / "c"), device="cpu",
                                  progress=False), log=lambda m: None)
    import hashlib
    with CacheReader(str(tmp_path / "c" / "mine.h5")) as r:
        assert r.attrs["arch"] == "file:mymodel.py:build"
        assert r.attrs["model_file_sha256"] == hashlib.sha256(USER_MODEL.encode()).hexdigest()
        assert r.attrs["preprocess"]["steps"] == [["ToTensor"]]


@pytest.mark.parametrize("factory,side", [(small_vit, 32), (tv("densenet121"), 64)], ids=["vit", "densenet121"])
def test_truncated_backward_bit_identical(factory, side, tmp_path):
    model = randomize(factory()).requires_grad_(False)
    x = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(3))
    scores = ["gaia_a", "gaia_z", "nac", "gradnorm"]
    a = extract_tensor(model, "m", x, str(tmp_path / "a.h5"), scores, batch_size=2, truncate=True)
    b = extract_tensor(model, "m", x, str(tmp_path / "b.h5"), scores, batch_size=2, truncate=False)
    import h5py
    with h5py.File(a) as fa, h5py.File(b) as fb:
        paths = []
        fa.visit(lambda p: paths.append(p) if isinstance(fa[p], h5py.Dataset) else None)
        assert any("grad/feature_sum" in p for p in paths) and any("grad/max_logit" in p for p in paths)
        for p in paths:
            np.testing.assert_array_equal(fa[p][()], fb[p][()], err_msg=p)


def test_refusals_name_the_score_layer_and_reason():
    vit = adapter_for(small_vit().eval(), (3, 32, 32))
    assert any("class_token" in r for r in unserved(vit, *requirements(["tracking"])))
    # MobileViT's transformer runs on patches folded into the batch axis: rows that are not images
    mobilevit = adapter_for(build_model("timm:mobilevit_xxs", 5), (3, 64, 64))
    assert "rows that are not images" in mobilevit.why_not_hookable("stages.2.1.transformer.0.norm1")
    assert not any("transformer" in n for n in mobilevit.hook_set("bn"))
    resnet = adapter_for(build_model("resnet18", 5), (3, 32, 32))
    with pytest.raises(ValueError, match="runs 2 times per forward"):
        adapter_for(build_model("torchvision:resnet18", 5), (3, 64, 64)).hook_set("layer1.0.relu")
    with pytest.raises(ValueError, match="matches no module"):
        adapter_for(build_model("resnet18", 5), (3, 32, 32), hook_sets={"bn": ["nothing.*"]}).hook_set("bn")
    assert resnet.hook_set("before_head") == ref.gaia_before_head_modules(build_model("resnet18", 5), "resnet")
    timm_eff = adapter_for(timm.create_model("efficientnet_b0", pretrained=False, num_classes=5).eval(), (3, 64, 64))
    bn = timm_eff.hook_set("bn")       # a BN with a fused SiLU is recorded before the SiLU
    assert any(n.endswith(".drop") for n in bn)
    assert not any(getattr(timm_eff.modules[n], "act", None) is not None
                   and not isinstance(timm_eff.modules[n].act, nn.Identity) for n in bn)


def test_hook_set_override_by_glob():
    model = build_model("torchvision:densenet121", 5)
    adapter = adapter_for(model, (3, 64, 64), hook_sets={"bn": ["features.denseblock4.*.norm1"]})
    layers = adapter.hook_set("bn")
    assert len(layers) == 16 and all(l.startswith("features.denseblock4.") and l.endswith("norm1") for l in layers)


def test_bit_npz_in_big_transfer_layout(tmp_path):
    """A Big Transfer .npz (HWIO kernels, a/b/c unit names, proj shortcut) loads into the
    BiT layout: the same tensors and logits as the model it was written from."""
    from gradood.extract.checkpoint import load_checkpoint
    model = randomize(tiny_bit())
    arrays = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        v = value.numpy()
        if key.startswith("root."):
            name = "resnet/root_block/standardized_conv2d/kernel"
        elif key.startswith("before_head.gn."):
            name = "resnet/group_norm/" + ("gamma" if parts[-1] == "weight" else "beta")
        elif key.startswith("head.conv."):
            name = "resnet/head/conv2d/" + ("kernel" if parts[-1] == "weight" else "bias")
        else:
            _, block, unit, module, what = parts
            if module == "downsample":
                name = f"resnet/{block}/{unit}/a/proj/standardized_conv2d/kernel"
            else:
                letter = "abc"[int(module[-1]) - 1]
                name = (f"resnet/{block}/{unit}/{letter}/standardized_conv2d/kernel" if module.startswith("conv")
                        else f"resnet/{block}/{unit}/{letter}/group_norm/{'gamma' if what == 'weight' else 'beta'}")
        arrays[name] = v.transpose(2, 3, 1, 0) if v.ndim == 4 else v
    np.savez(tmp_path / "BiT-tiny.npz", **arrays)
    fresh = tiny_bit()
    load_checkpoint(fresh, str(tmp_path / "BiT-tiny.npz"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="read only for the BiT"):
        load_checkpoint(build_model("resnet18", 5), str(tmp_path / "BiT-tiny.npz"))


def test_open_ood_pruned_checkpoint_and_masked_tracking(tmp_path):
    """gradient tracking's lottery-ticket checkpoint (``PrunedModel``: ``model.`` weights,
    ``mask_<name with ___>`` buffers): masks multiplied into the weights, and the tracked
    norms are of ``grad * mask`` as the release's extract_gradients takes them."""
    from gradood.extract.checkpoint import load_checkpoint
    from gradood.extract.tracking import per_sample_grad_norms, tracked_parameters
    model = randomize(build_model("resnet20", 10))
    names = tracked_parameters(model)
    assert len(names) == 20 and names[0] == "conv1.weight" and names[-1] == "linear.weight"
    params = dict(model.named_parameters())
    saved, masks = {}, {}
    for name in names:      # 20 % of each tensor pruned by magnitude
        w = params[name].detach()
        masks[name] = (w.abs() > w.abs().flatten().kthvalue(int(0.2 * w.numel())).values).float()
        saved["mask_" + name.replace(".", "___")] = masks[name]
    saved.update({f"model.{k}": v for k, v in model.state_dict().items()})
    torch.save(saved, tmp_path / "level1_ep100.pth")
    fresh = build_model("resnet20", 10)
    load_checkpoint(fresh, str(tmp_path / "level1_ep100.pth"))
    fresh.requires_grad_(False)
    for name in names:
        torch.testing.assert_close(dict(fresh.named_parameters())[name], params[name].detach() * masks[name])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    got = per_sample_grad_norms(fresh, x, names).numpy()
    fp = dict(fresh.named_parameters())
    for i in range(2):
        for k in (0, 7):
            for p in fp.values():
                p.requires_grad_(True)
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(fresh(x[i:i + 1]), torch.tensor([k]))
                grads = torch.autograd.grad(loss, [fp[n] for n in names])
            fresh.requires_grad_(False)
            close(got[i, k], [(g * masks[n]).norm().item() for n, g in zip(names, grads)], rtol=1e-5)
            unmasked = np.array([g.norm().item() for g in grads])
            assert np.all(unmasked > got[i, k] * (1 + 1e-4))      # the mask matters
    bad = dict(saved, mask_linear___weight=torch.ones(3, 3))
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="mask_linear___weight has shape"):
        load_checkpoint(build_model("resnet20", 10), str(tmp_path / "bad.pth"))


def test_gaia_z_on_bit_reads_the_imagenet_hook_set(tmp_path):
    """GAIA's ImageNet command runs GAIA-Z on -hook before_head: the block4 GroupNorms and
    the pooled before_head output (the imagenet preset sets gaia_z.hooks=before_head)."""
    from gradood.store.benchmarks import preset_params
    model = randomize(tiny_bit())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    params = preset_params({"benchmark": "imagenet"})
    assert params["gaia_z"] == {"hooks": "before_head"}
    path = extract_tensor(model, "BiT-S-R50x1", x, str(tmp_path / "bit.h5"), ["gaia_z"], params=params)
    want, _ = ref.gaia_z(model, x, ref.gaia_before_head_modules(model, "bit"))
    with CacheReader(path) as r:
        assert r.attrs["hook_sets"]["before_head"] == ref.gaia_before_head_modules(model, "bit")
        assert rel_err(compute_score(r, "gaia_z", **params["gaia_z"]), want) <= 1e-6


def test_timm_data_config_preprocessing():
    from gradood.extract.datasets import build_transform, probe_shape
    model = build_model("timm:vit_tiny_patch16_224", 5)
    transform, description = build_transform("timm", model=model)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert description["steps"][0] == ["Resize", int(224 / cfg["crop_pct"]), cfg["interpolation"]]
    assert description["steps"][-1] == ["Normalize", tuple(cfg["mean"]), tuple(cfg["std"])]
    assert probe_shape(transform) == (3, 224, 224)
    with pytest.raises(ValueError, match="timm model's data config"):
        build_transform("timm", model=build_model("resnet18", 5))


def test_token_maps_and_count_above_on_a_vit(tmp_path):
    """A token sequence (N, T, C) is stored channels first as (N, C, T, 1): maps, statistics
    recomputed from them and count_above agree with the tokens themselves."""
    from gradood.analyze.data import CacheData
    model = randomize(small_vit()).requires_grad_(False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    layer = "encoder.layers.encoder_layer_1.ln_2"
    path = extract_tensor(model, "vit", x, str(tmp_path / "raw.h5"), ["msp"], hooks=[layer],
                          policies={layer: "raw"}, batch_size=3)
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: captured.__setitem__("t", o.clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    tokens = captured["t"].numpy()                                  # (N, T, C)
    with CacheReader(path) as r:
        data = CacheData(r)
        maps = data.map(layer, "act")
        assert maps.shape == (3, 32, 17, 1) and r.attrs["layer_shapes"][layer] == [32, 17, 1]
        np.testing.assert_allclose(maps[..., 0], tokens.transpose(0, 2, 1), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(data.count_above(layer, "act", 0.5), (np.abs(tokens) > 0.5).sum(axis=1))
        close(data.stat(layer, "act", "mean"), tokens.mean(axis=1))


# ------------------------------------------------------------------ models that return more than logits
class _Body(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def features(self, x):
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


class TupleNet(_Body):
    """OpenOOD's ``return_feature`` shape: (logits, features)."""
    def forward(self, x):
        f = self.features(x)
        return self.fc(f), f


class FeaturesFirstNet(_Body):
    """(features, logits): both 2-D; the logits are the (N, K) one."""
    def forward(self, x):
        f = self.features(x)
        return f, self.fc(f)


class DictNet(_Body):
    """A Hugging Face-like output: a dict with "logits"."""
    def forward(self, x):
        f = self.features(x)
        return {"hidden": f, "logits": self.fc(f)}


@pytest.mark.parametrize("net", [TupleNet, FeaturesFirstNet, DictNet], ids=["tuple", "features-first", "dict"])
def test_a_model_returning_a_tuple_or_dict_serves_every_score_per_sample(net, tmp_path):
    from gradood.extract.models import select_logits
    model = select_logits(net(), classes=5)
    check_model(model, 16, {"bn": "NCHW"}, tmp_path)          # logits, features, GradNorm, BN stats vs autograd


def test_output_picks_the_logits_and_names_what_the_output_holds(tmp_path):
    from bench.helpers import run_cli
    from gradood.extract.models import logits_of, select_logits
    source = tmp_path / "nets.py"
    source.write_text("import torch, torch.nn as nn\n"
                      "class Two(nn.Module):\n"
                      "    def __init__(self, k):\n        super().__init__()\n        self.fc = nn.Linear(3, k)\n"
                      "    def forward(self, x):\n        f = x.mean(dim=(2, 3))\n        return f, self.fc(f)\n"
                      "def two(num_classes):\n    return Two(num_classes)\n")
    code, out = run_cli(["scores", "--model-file", f"{source}:two", "--num-classes", "4", "--image-size", "16"])
    assert code == 0 and "head fc, 3 features" in out, out                   # the (N, 4) entry, automatically
    # with K = 3 both entries are (N, 3): refused as ambiguous; --output 1 picks the logits
    code, out = run_cli(["scores", "--model-file", f"{source}:two", "--num-classes", "3", "--image-size", "16"])
    assert code == 2 and "holding 0: (2, 3), 1: (2, 3): more than one could be the (N, 3) logits; pick them " \
        "with --output INDEX or KEY" in out, out
    code, out = run_cli(["scores", "--model-file", f"{source}:two", "--num-classes", "3", "--image-size", "16",
                         "--output", "1"])
    assert code == 0 and "head fc, 3 features" in out, out
    with pytest.raises(ValueError, match=r"holding 0: \(2, 3\), 1: \(2, 7\), with no \(N, 5\) logits.*--output"):
        logits_of((torch.zeros(2, 3), torch.zeros(2, 7)), classes=5)
    with pytest.raises(ValueError, match="--output logits: the model returns one tensor"):
        logits_of(torch.zeros(2, 5), "logits")
    with pytest.raises(ValueError, match="--output score: the model's dict holds logits: \\(2, 5\\)"):
        logits_of({"logits": torch.zeros(2, 5)}, "score")
    net = select_logits(TupleNet(), "0")
    assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 5)
    # extraction through the same door records the choice
    import importlib.util
    from PIL import Image
    spec = importlib.util.spec_from_file_location("nets_for_output", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.two(3).state_dict(), tmp_path / "two.pt")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for j in range(2):
        Image.fromarray(np.full((16, 16, 3), 50 * j, np.uint8)).save(tmp_path / "imgs" / "a" / f"{j}.png")
    code, out = run_cli(["extract", "--model-file", f"{source}:two", "--num-classes", "3", "--output", "1",
                         "--checkpoint", str(tmp_path / "two.pt"), "--preprocess", "totensor", "--score", "msp",
                         "--dataset", f"x={tmp_path / 'imgs'}", "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert code == 0, out
    with CacheReader(str(tmp_path / "c" / "x.h5")) as r:
        assert r.attrs["output"] == "1" and r.attrs["head"] == "fc" and r.read_all("logits").shape == (2, 3)


ONE_CHANNEL = """
import torch.nn as nn


def build(num_classes):
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))
"""


def test_a_one_channel_model_takes_the_grayscale_preset(tmp_path):
    """An MNIST-like model: per sample against autograd on one-channel inputs; the error on
    three-channel inputs names the channels and the grayscale presets; `--preprocess mnist`
    extracts it, and the cached logits are the model's on the preset's tensors."""
    from PIL import Image

    from bench.helpers import run_cli
    from gradood.extract.datasets import build_transform, load_rgb
    source = tmp_path / "one.py"
    source.write_text(ONE_CHANNEL)
    model = build_model(None, 10, f"{source}:build")
    check_model(model, 28, {"1": "NCHW"}, tmp_path, channels=1)
    code, out = run_cli(["scores", "--model-file", f"{source}:build", "--num-classes", "10"])
    assert code == 2 and "expects 1-channel images, and the preprocessing gives 3" in out
    assert "grayscale presets: mnist, fashion_mnist" in out and "Traceback" not in out
    code, out = run_cli(["scores", "--model-file", f"{source}:build", "--num-classes", "10", "--preprocess", "mnist"])
    assert code == 0 and "traced at 1x28x28" in out, out
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for j in range(3):
        Image.fromarray(np.full((28, 28, 3), (40 * j, 90, 200), np.uint8)).save(tmp_path / "imgs" / "a" / f"{j}.png")
    model = randomize(build_model(None, 10, f"{source}:build"))
    torch.save(model.state_dict(), tmp_path / "one.pt")
    code, out = run_cli(["extract", "--model-file", f"{source}:build", "--num-classes", "10", "--checkpoint",
                         str(tmp_path / "one.pt"), "--preprocess", "mnist", "--score", "msp,gaia_z",
                         "--dataset", f"x={tmp_path / 'imgs'}", "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert code == 0, out
    transform, _ = build_transform("mnist")
    x = torch.stack([transform(load_rgb(str(tmp_path / "imgs" / "a" / f"{j}.png"))) for j in range(3)])
    assert x.shape == (3, 1, 28, 28)
    with torch.no_grad():
        want = model.eval()(x).numpy()
    with CacheReader(str(tmp_path / "c" / "x.h5")) as r:
        close(r.read_all("logits"), want)


def check_doors_agree(model, label, side):
    """For every registered score (the Mahalanobis ensemble excluded: it needs a fitted
    training cache, not a model property): `pipeline.py scores` predicts it served
    (``model_refusals``, what the command prints) exactly when `extract --score NAME`
    passes its score check (``check_scores``) and builds its extraction plan; and a score
    refused for a hook set or pass fails at the plan too, without the check. Returns the
    number of scores checked."""
    from gradood.analyze.registry import all_entries
    from gradood.extract import ExtractConfig
    from gradood.extract.adapters.serves import unserved
    from gradood.extract.cli_support import check_scores
    from gradood.extract.runner import ExtractionPlan
    from gradood.pipeline import model_refusals
    adapter = adapter_for(model, (3, side, side))
    checked = 0
    for name in all_entries():
        needs, passes = requirements([name])
        if "mahalanobis" in passes:
            continue
        refused = model_refusals([name], {}, adapter)
        config = ExtractConfig(needs=needs, passes=passes, arch=label, num_classes=adapter.num_classes,
                               odin_std=(0.5, 0.5, 0.5) if "iodin" in passes else None, scores=(name,),
                               refusals=lambda a, name=name: model_refusals([name], {}, a))

        def door(config):
            try:
                ExtractionPlan(model, config, (3, side, side), torch.device("cpu"), adapter)
                return ""
            except ValueError as err:
                return str(err)
        try:
            extracted = door(check_scores(config, adapter, print))
        except ValueError as err:
            extracted = str(err)
        assert bool(refused) == bool(extracted), (name, refused, extracted)
        if unserved(adapter, needs, passes):
            assert door(config), name            # the plan alone refuses it as well
        checked += 1
    return checked


@pytest.mark.parametrize("label,factory,side,layouts", MODELS, ids=[m[0] for m in MODELS])
def test_scores_and_extract_agree_on_every_score(label, factory, side, layouts):
    assert check_doors_agree(randomize(factory()).requires_grad_(False), label, side) >= 40
