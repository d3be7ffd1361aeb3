"""Models whose logits are not a linear map of one feature vector: a cosine classifier, an
``F.linear`` head in the model's own ``forward``, SqueezeNet (1x1 conv, ReLU, pool), and
two averaged heads (timm's distilled DeiT and LeViT).

Each is extracted with random weights on tiny inputs and checked per sample against a
batch-size-1 autograd loop: the logits, the features (taken where the test says they are,
not where the tracing finds them), and the activation and max-logit gradient statistics
of one hooked layer. Every score that reads the linear head is refused by name, by
``pipeline.py scores``' prediction, by extraction when named, and by analysis; the
others are computed.
"""
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.helpers import compute_score, extract_tensor, image_set
from gradood.analyze.engine import Engine
from gradood.analyze.registry import all_entries, default_scores, entry, requirements
from gradood.extract import ExtractConfig, Provenance
from gradood.extract.adapters import HookSetError, adapter_for
from gradood.extract.runner import extract_to_cache
from gradood.pipeline import model_refusals
from gradood.store.reader import CacheReader
from gradood.store.schema import stat_path

timm = pytest.importorskip("timm")
import torchvision  # noqa: E402

from tests.test_models import check_doors_agree, close, per_sample_reference, randomize  # noqa: E402


class CosineHead(nn.Module):
    """s * normalize(f) @ normalize(W).T, the head of many OOD training methods."""
    def __init__(self, d, k, s=16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, d))
        self.s = s

    def forward(self, f):
        return self.s * F.normalize(f, dim=1) @ F.normalize(self.weight, dim=1).T


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())


class CosineNet(_Body):
    def __init__(self, k=5):
        super().__init__()
        self.head = CosineHead(12, k)

    def forward(self, x):
        return self.head(self.body(x))


class FunctionalLinearNet(_Body):
    """The head's weight is the model's own parameter, applied with ``F.linear``."""
    def __init__(self, k=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, 12))
        self.bias = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        return F.linear(self.body(x), self.weight, self.bias)


def deit():
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5, img_size=32,
                             patch_size=8, depth=2)


# label, factory, image side, (feature module, "input"/"output", pooled over positions),
# {hooked module: its output layout, as the test knows it}
HEADLESS = [
    ("cosine head", CosineNet, 16, ("head", "input", False), {"body.1": "NCHW"}),
    ("F.linear head", FunctionalLinearNet, 16, ("body", "output", False), {"body.4": "NCHW"}),
    ("torchvision:squeezenet1_1", lambda: torchvision.models.squeezenet1_1(num_classes=5), 64,
     ("classifier.1", "input", True), {"features.3": "NCHW"}),
    ("timm deit_tiny_distilled", deit, 32, ("head_dist", "input", False), {"blocks.1.norm1": "NTC"}),
    ("timm levit_128s", lambda: timm.create_model("levit_128s", pretrained=False, num_classes=5, img_size=64), 64,
     ("head_dist.linear", "input", False), {"stages.0": "NTC"}),
]


def served_by_prediction(adapter):
    """Default scores `pipeline.py scores` predicts served on ``adapter``
    (``model_refusals``), and the refused ones with their reasons."""
    refused = model_refusals(default_scores(), {}, adapter)
    return [n for n in default_scores() if n not in refused], refused


@pytest.mark.parametrize("label,factory,side,feature,layouts", HEADLESS, ids=[m[0] for m in HEADLESS])
def test_a_model_without_a_linear_head_serves_what_does_not_read_one(label, factory, side, feature, layouts,
                                                                     tmp_path):
    torch.manual_seed(0)
    model = randomize(factory()).eval().requires_grad_(False)
    x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(1))
    adapter = adapter_for(model, (3, side, side))
    assert adapter.head_name == "" and adapter.head_weight_bias() is None
    assert (adapter.features.module, adapter.features.side, adapter.features.pooled) == feature
    served, refused = served_by_prediction(adapter)
    head_scores = {n for n in default_scores() if entry(n).reads_head()}
    assert {"gradnorm", "react", "vim", "ash", "dice", "scale", "nac"} <= head_scores
    for name in head_scores:
        assert name in refused and "reads the linear head" in refused[name][0], (name, refused.get(name))
    assert {"msp", "energy", "maxlogit", "knn", "mahalanobis", "odin"} <= set(served), refused

    path = str(tmp_path / "cache.h5")
    needs, passes = requirements(served)
    needs += [(layer, source, stat) for layer in layouts for source, stat in
              (("act", "mean"), ("max_logit", "mean"), ("max_logit", "nonzero"))]
    config = ExtractConfig(arch=label, needs=needs, passes=passes, hooks=tuple(layouts), odin_std=(0.5, 0.5, 0.5),
                           batch_size=3, device="cpu", progress=False)
    extract_to_cache(model, image_set(x), path, config, Provenance(dataset="cache"))
    want = per_sample_reference(model, x, layouts, feature)
    with torch.no_grad():
        logits = model(x).numpy()
    with CacheReader(path) as r:
        assert r.attrs["head"] == "" and not r.has("head/weight")
        assert r.attrs["feature_dim"] == want["features"].shape[1]
        close(r.read_all("logits"), logits)
        close(r.read_all("logits"), want["logits"])
        close(r.read_all("features"), want["features"])
        for layer, layout in layouts.items():
            assert r.attrs["layer_layouts"][layer] == layout
            rec = want["layers"][layer]
            close(r.read(stat_path(layer, "act", "mean")), rec["act_mean"])
            close(r.read(stat_path(layer, "max_logit", "mean")), rec["grad_mean"], rtol=1e-4,
                  scale=np.abs(rec["grad_mean"]).max())
            np.testing.assert_array_equal(r.read(stat_path(layer, "max_logit", "nonzero")), rec["grad_nonzero"])
        for name in ("msp", "energy", "maxlogit"):
            assert np.all(np.isfinite(compute_score(r, name)))
        z = want["logits"].astype(np.float64)
        np.testing.assert_allclose(compute_score(r, "maxlogit"), z.max(axis=1), rtol=1e-5)

    # analysis refuses the head readers by name (the same reason as the prediction)
    engine = Engine(str(tmp_path), "cache")
    try:
        assert "reads the linear head" in engine.why_not("gradnorm")
        assert engine.why_not("msp") == ""
    finally:
        engine.close()


def test_extraction_refuses_a_named_head_reader_and_analysis_has_no_head(tmp_path):
    from gradood.extract.cli_support import check_scores
    from gradood.pipeline import model_refusals
    model = randomize(CosineNet()).eval().requires_grad_(False)
    names = ["msp", "gradnorm"]
    needs, passes = requirements(names)
    config = ExtractConfig(arch="cos", needs=needs, passes=passes, device="cpu", scores=tuple(names),
                           refusals=lambda a: model_refusals(names, {}, a))
    with pytest.raises(ValueError, match=r"gradnorm: it reads the linear head .* no nn.Linear or 1x1 nn.Conv2d "
                                         r"of the model outputs its logits"):
        check_scores(config, adapter_for(model, (3, 16, 16)), print)
    # a plugin score that reads the head without declaring it gets the cache's reason
    path = extract_tensor(model, "cos", torch.randn(4, 3, 16, 16), str(tmp_path / "c.h5"), ["msp"])
    from gradood.analyze.data import CacheData
    from gradood.store.schema import CacheError
    with CacheReader(path) as r, pytest.raises(CacheError, match="has no linear head"):
        CacheData(r).head_weight
    with CacheReader(path) as r:
        attrs = dict(r.attrs)
    assert attrs["features"] == "head input" and attrs["schema_version"] == 4
    # the feature source is part of a cache's identity (reuse, mixing caches); a linear-head
    # cache's identity is the same in every schema version
    from gradood.store.schema import identity
    from gradood.store.writer import run_identity
    other = {**attrs, "features": "body output"}
    assert identity(attrs)["features"] != identity(other)["features"]
    assert run_identity(attrs) != run_identity(other)
    linear = {**attrs, "head": "fc", "schema_version": 3}
    assert run_identity(linear) == run_identity({**linear, "schema_version": 4, "features": "x"})
    # a head-less cache must be version 4 and hold no head datasets
    import shutil
    import h5py
    for edit, name in ((lambda f: f.attrs.__setitem__("schema_version", 3), "v3.h5"),
                       (lambda f: f.create_dataset("head/weight", data=np.zeros((5, 12), np.float32)), "w.h5")):
        copy = str(tmp_path / name)
        shutil.copy(path, copy)
        with h5py.File(copy, "r+") as f:
            edit(f)
        with pytest.raises(CacheError, match=r'head "" \(no linear head\) needs schema version 4'):
            CacheReader(copy)


def test_squeezenet_with_head_is_refused_before_anything_runs():
    model = torchvision.models.squeezenet1_1(num_classes=5).eval()
    with pytest.raises(HookSetError, match=r"--head classifier.1: its input per image is 512x13x13"):
        adapter_for(model, (3, 224, 224), head="classifier.1")
    assert adapter_for(model, (3, 224, 224)).feature_dim == 512      # without --head: pooled as documented


@pytest.mark.parametrize("label,factory,side,feature,layouts", HEADLESS, ids=[m[0] for m in HEADLESS])
def test_scores_and_extract_agree_without_a_linear_head(label, factory, side, feature, layouts):
    assert check_doors_agree(randomize(factory()).eval().requires_grad_(False), label, side) >= 40


def test_the_docs_model_table_is_the_generators_output():
    """docs/model_table.md lists every model of ``bench/model_table.py`` and its rows are
    what the generator writes (checked on two cheap rows: one with a head, one without)."""
    import os
    from bench import model_table
    with open(model_table.OUT) as f:
        text = f.read()
    names, total = model_table.score_names()
    assert text.startswith(model_table.HEADER.format(total=total))
    for arch, _, side in model_table.MODELS:
        assert f"| `{arch}` | {side} |" in text, arch
    for arch, classes, side in [m for m in model_table.MODELS if m[0] in ("resnet20", "torchvision:squeezenet1_1")]:
        assert model_table.row(arch, classes, side, names) + "\n" in text, arch
    assert os.path.basename(model_table.OUT) in open(os.path.join(os.path.dirname(model_table.OUT), "models.md")).read()


COSINE_FILE = '''
import torch.nn as nn
import torch.nn.functional as F


class Cosine(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.weight = nn.Parameter(torch.randn(k, 8))

    def forward(self, x):
        f = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return 10 * F.normalize(f, dim=1) @ F.normalize(self.weight, dim=1).T


def build(num_classes):
    return Cosine(num_classes)
'''


def test_the_cli_serves_a_cosine_model_and_names_what_it_refuses(tmp_path):
    """``scores``, ``extract`` and ``analyze`` on a model file whose cosine head is computed
    in its own ``forward``: the head readers are refused by name at each door, the rest run."""
    from PIL import Image
    from bench.helpers import run_cli
    source = tmp_path / "cos.py"
    source.write_text("import torch\n" + COSINE_FILE)
    model = f"{source}:build"
    code, out = run_cli(["scores", "--model-file", model, "--num-classes", "3", "--image-size", "16"])
    assert code == 0 and "head none (logits not a linear map), 8 features from bn" in out, out
    assert "gradnorm: not served: it reads the linear head" in out and "msp" in out, out
    import importlib.util
    spec = importlib.util.spec_from_file_location("cos_for_cli", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.build(3).state_dict(), tmp_path / "cos.pt")
    rng = np.random.default_rng(0)
    for name in ("id", "ood"):
        (tmp_path / name / "a").mkdir(parents=True)
        for j in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name / "a" / f"{j}.png")
    common = ["--model-file", model, "--num-classes", "3", "--checkpoint", str(tmp_path / "cos.pt"),
              "--preprocess", "totensor", "--cache-dir", str(tmp_path / "c"), "--quiet"]
    code, out = run_cli(["extract", *common, "--score", "msp", "--score", "gradnorm", "--dataset", f"id={tmp_path / 'id'}"])
    assert code == 2 and "gradnorm: it reads the linear head" in out and "msp" not in out.split("error:")[-1], out
    for name in ("id", "ood"):
        code, out = run_cli(["extract", *common, "--dataset", f"{name}={tmp_path / name}"])   # the default scores
        assert code == 0, out
        assert re.search(r"note: left out of the extraction: [a-z_, ]*\bgradnorm\b[a-z_, ]*: it reads the linear "
                         r"head", out), out
        assert "note: left out of the extraction: gaia_a: hook set 'before_head'" in out, out
    code, out = run_cli(["analyze", "--cache-dir", str(tmp_path / "c"), "--id", "id", "--ood", "ood",
                         "--results", str(tmp_path / "r"), "--score", "all"])
    assert code == 0, out
    assert "gradnorm left out: gradnorm is not defined on this model: it reads the linear head" in out, out
    summary = (tmp_path / "r" / "summary.csv").read_text()
    assert "MSP" in summary and "GradNorm" not in summary
    assert "head none (logits not a linear map)" in (tmp_path / "r" / "report.html").read_text()
    code, out = run_cli(["inspect", str(tmp_path / "c" / "id.h5")])
    assert code == 0 and "head none (logits not a linear map)" in out and "schema       v4" in out, out
    assert "features from bn output, averaged" in out, out


# ------------------------------------------------------------ where the features are found
class Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.5))

    def forward(self, z):
        return z / self.t


class TemperatureNet(_Body):
    """A linear head, then a learned temperature: the logits are not the head's output."""
    def __init__(self, k=5):
        super().__init__()
        self.fc, self.temp = nn.Linear(12, k), Temperature()

    def forward(self, x):
        return self.temp(self.fc(self.body(x)))


class LogitNormNet(_Body):
    """A BatchNorm1d over the head's output (a BN-neck on the logits)."""
    def __init__(self, k=5):
        super().__init__()
        self.fc, self.bn = nn.Linear(12, k), nn.BatchNorm1d(k)

    def forward(self, x):
        return self.bn(self.fc(self.body(x)))


class BufferHead(nn.Module):
    """Class embeddings held in a buffer (a zero-shot head): no parameters of its own."""
    def __init__(self, d, k):
        super().__init__()
        self.register_buffer("classes", F.normalize(torch.randn(k, d), dim=1))

    def forward(self, f):
        return 10 * F.normalize(f, dim=1) @ self.classes.T


class BufferHeadNet(_Body):
    def __init__(self, k=5):
        super().__init__()
        self.head = BufferHead(12, k)

    def forward(self, x):
        return self.head(self.body(x))


class ChannelsLastNet(_Body):
    """A per-position linear classifier on a channels-last map, averaged over positions."""
    def __init__(self, k=5):
        super().__init__()
        self.cls = nn.Linear(12, k)

    def forward(self, x):
        return self.cls(self.body[:6](x).permute(0, 2, 3, 1)).mean(dim=(1, 2))


class SharedHeadNet(CosineNet):
    """One cosine head applied to two views, averaged: it runs twice."""
    def forward(self, x):
        return (self.head(self.body(x)) + self.head(self.body(x.flip(3)))) / 2


class KeywordHeadNet(CosineNet):
    def forward(self, x):
        return self.head(f=self.body(x))


@pytest.mark.parametrize("factory,module,pooled", [
    (TemperatureNet, "fc", False), (LogitNormNet, "fc", False), (BufferHeadNet, "head", False),
    (ChannelsLastNet, "cls", True)], ids=["temperature", "logit BN", "buffer head", "channels last"])
def test_the_features_are_the_input_of_the_module_that_makes_the_logits(factory, module, pooled):
    """Modules applied to the logits (a temperature, a norm) are walked back over; a head
    without parameters of its own is found by its output; a channels-last input is averaged
    over its positions, not over its channels."""
    model = randomize(factory()).eval().requires_grad_(False)
    adapter = adapter_for(model, (3, 8, 8))
    assert adapter.head_name == "" and (adapter.features.module, adapter.features.pooled) == (module, pooled)
    assert adapter.feature_dim == 12
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    want, got = {}, {}
    handle = dict(model.named_modules())[module].register_forward_pre_hook(lambda m, a: want.__setitem__("x", a[0]))
    capture = adapter.capture_features(got)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        capture.remove()
    truth = want["x"].mean(dim=(1, 2)) if pooled else want["x"]       # channels last: (N, H, W, C)
    close(got["x"].numpy(), truth.numpy())


def test_a_model_whose_logits_maker_cannot_be_hooked_is_refused_with_the_reason():
    with pytest.raises(HookSetError, match="head makes the logits and runs 2 times per forward pass"):
        adapter_for(SharedHeadNet().eval(), (3, 8, 8))
    with pytest.raises(HookSetError, match="head makes the logits and takes its input by keyword"):
        adapter_for(KeywordHeadNet().eval(), (3, 8, 8))
    # a linear layer whose output is not the logits cannot be named as the head
    with pytest.raises(HookSetError, match="--head fc: its output is not the model's logits"):
        adapter_for(TemperatureNet().eval(), (3, 8, 8), head="fc")
    with pytest.raises(HookSetError, match="--head head: its output is not the model's logits"):
        adapter_for(deit().eval(), (3, 32, 32), head="head")


class _Total(nn.Module):
    def forward(self, x):
        return x.sum()


class ScalarSideOutputNet(_Body):
    """A submodule returning a 0-dim tensor (an auxiliary loss term) beside a linear head."""
    def __init__(self, k=5):
        super().__init__()
        self.total, self.fc = _Total(), nn.Linear(12, k)

    def forward(self, x):
        f = self.body(x)
        self.total(f)
        return self.fc(f)


def test_a_scalar_output_does_not_stop_the_search_for_the_logits():
    adapter = adapter_for(ScalarSideOutputNet().eval(), (3, 8, 8))
    assert adapter.head_name == "fc" and adapter.feature_dim == 12
