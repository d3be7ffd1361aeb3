"""Benchmark (not a test): the newer detectors against the peers' own code, per sample.

Runs OpenOOD's postprocessors (``vra``, ``gram``, ``cfood``, ``nci``, ``adascale_a/l``: the
files of a checkout of Jingkang50/OpenOOD, loaded as they are, with a stub for the
package parts they import and ``.cuda()`` made a no-op on this CPU machine) and
pytorch-ood's ``WeightedEBO`` and ``MultiMahalanobis`` (when importable) on the demo
classifier and demo images, and gradood's scores from caches of the same images; prints
and writes the largest relative difference per detector to ``bench/peers.md`` / ``.json``.

    .venv/bin/python bench/peers.py --openood /path/to/OpenOOD [--site DIR]

``--site``: a folder added to ``sys.path`` holding statsmodels (AdaScale's ECDF) and
pytorch-ood (``pip install --target DIR --no-deps statsmodels pytorch-ood``). Needs
``make demo`` first (the checkpoint and data). Randomness: GRAM's held-out rows are drawn
by the release's global ``random`` seeded here as gradood seeds its own (0); CFOOD and
AdaScale run with every fitting row (alpha 1, fewer than 5,000 rows), so no draw differs;
MC-Dropout's masks are random in both and are not compared.
"""
import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)         # the package bench (helpers shared with the tests)

OPENOOD_FILES = ("postprocessors/base_postprocessor.py", "postprocessors/info.py", "postprocessors/vra_postprocessor.py",
                 "postprocessors/gram_postprocessor.py", "postprocessors/cfood_postprocessor.py",
                 "postprocessors/nci_postprocessor.py", "postprocessors/adascale_postprocessor.py",
                 "networks/adascale_net.py")


def openood_package(checkout, where):
    """A minimal ``openood`` package in ``where``: the listed files of ``checkout``, empty
    package initialisers, an empty ``utils.comm``."""
    for rel in ("", "utils", "postprocessors", "networks"):
        os.makedirs(os.path.join(where, "openood", rel), exist_ok=True)
        open(os.path.join(where, "openood", rel, "__init__.py"), "w").close()
    open(os.path.join(where, "openood", "utils", "comm.py"), "w").close()
    for rel in OPENOOD_FILES:
        shutil.copy(os.path.join(checkout, "openood", rel), os.path.join(where, "openood", rel))
    sys.path.insert(0, where)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--openood", required=True, help="a checkout of Jingkang50/OpenOOD")
    ap.add_argument("--site", default=None, help="folder with statsmodels and pytorch-ood")
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=200)
    args = ap.parse_args()
    if args.site:
        sys.path.insert(0, args.site)
    import numpy as np
    import torch
    import torch.nn as nn
    from gradood.extract import datasets as D
    from gradood.extract.checkpoint import load_checkpoint
    from gradood.extract.models import build_model
    from bench.helpers import compute_score, extract_tensor, fit_score
    from gradood.store.reader import CacheReader
    torch.Tensor.cuda = lambda self, *a, **k: self          # the releases call .cuda(); this machine has none
    work = tempfile.mkdtemp()
    openood_package(args.openood, work)

    model = build_model("resnet18", 10)
    load_checkpoint(model, os.path.join(ROOT, "checkpoints", "demo_resnet18.pt"))
    model.eval().requires_grad_(False)
    transform, _ = D.build_transform("demo", None, model)
    data = os.path.join(ROOT, "data", "demo")

    def tensors(rel, name, n, step=1):
        ds = D.open_dataset(data, "folder", rel, transform, name)
        idx = list(range(0, len(ds), step))[:n]
        items = [ds[i] for i in idx]
        return torch.stack([x for x, *_ in items]), torch.tensor([int(y) for _, y, *_ in items])

    train, labels = tensors("digits/train", "digits_train", args.train, step=max(1, 4000 // args.train))
    test_id, _ = tensors("digits/test", "digits", args.test // 2)
    test_ood, _ = tensors("mashups", "mashups", args.test // 2)
    test = torch.cat([test_id, test_ood])

    class Net(nn.Module):
        """The interface OpenOOD's postprocessors call: net(x, return_feature=True), net.fc."""
        def __init__(self, m):
            super().__init__()
            self.m, self.fc, self.feature_size = m, m.linear, m.linear.in_features

        @property
        def backbone(self):          # AdaScale reads net.backbone.feature_size
            return self

        def forward(self, x, return_feature=False, return_feature_list=False):
            got = {}
            h = self.fc.register_forward_pre_hook(lambda mod, a: got.__setitem__("x", a[0]))
            try:
                z = self.m(x)
            finally:
                h.remove()
            return (z, got["x"].flatten(1)) if return_feature else z

        def get_fc_layer(self):
            return self.fc

    net = Net(model).eval()
    batches = lambda x, y=None: [{"data": x[i:i + 100], "label": (y[i:i + 100] if y is not None else
                                  torch.zeros(len(x[i:i + 100]), dtype=torch.long))} for i in range(0, len(x), 100)]
    loaders = {"train": batches(train, labels), "val": batches(train, labels)}
    cfg = lambda name, **a: types.SimpleNamespace(
        postprocessor=types.SimpleNamespace(postprocessor_args=types.SimpleNamespace(**a), postprocessor_sweep={}),
        dataset=types.SimpleNamespace(name="cifar10"))

    def theirs(post, wrapped=None):
        n = wrapped or net
        random.seed(0)        # GRAM's held-out draw: the global generator, seeded as gradood seeds its own
        post.setup(n, loaders, {})
        return np.concatenate([post.postprocess(n, test[i:i + 50])[1].double().reshape(-1).numpy()
                               for i in range(0, len(test), 50)])

    caches = {}

    def ours(score, **params):
        needs_pass = score in ("gram", "adascale_a", "adascale_l")
        key = "gram" if score == "gram" else ("adascale_a" if needs_pass else "msp")
        if key not in caches:
            caches[key] = (extract_tensor(model, "resnet18", train, os.path.join(work, f"{key}_train.h5"), [key],
                                          batch_size=100, labels=labels, name="train"),
                           extract_tensor(model, "resnet18", test, os.path.join(work, f"{key}_test.h5"), [key],
                                          batch_size=100))
        with CacheReader(caches[key][0]) as t, CacheReader(caches[key][1]) as r:
            from gradood.analyze.registry import entry
            fitted = fit_score(t, score, **params) if entry(score).fitted else None
            return compute_score(r, score, fitted, **params)

    rows = {}

    def record(name, mine, peer, note=""):
        rel = np.abs(mine - peer) / np.maximum(np.abs(peer), 1e-12)
        rows[name] = {"max_rel": float(rel.max()), "median_rel": float(np.median(rel)),
                      "max_abs_over_range": float(np.abs(mine - peer).max() / np.ptp(peer)), "n": int(len(peer)),
                      "note": note}
        print(f"{name}: max rel diff {rows[name]['max_rel']:.2e} (median {rows[name]['median_rel']:.1e}, max abs "
              f"diff / score range {rows[name]['max_abs_over_range']:.1e}) over {len(peer)} samples {note}", flush=True)

    from openood.postprocessors.vra_postprocessor import VRAPostprocessor
    from openood.postprocessors.nci_postprocessor import NCIPostprocessor
    from openood.postprocessors.cfood_postprocessor import CFOODPostprocessor
    from openood.postprocessors.gram_postprocessor import GRAMPostprocessor
    record("vra (OpenOOD vra_postprocessor)", ours("vra"), theirs(VRAPostprocessor(cfg("vra", percentile_high=90,
                                                                                       percentile_low=10))),
           "(fitted on the same rows: OpenOOD's val loader is given the training images)")
    record("nci (OpenOOD nci_postprocessor)", ours("nci"), theirs(NCIPostprocessor(cfg("nci", alpha=0.0001))))
    record("cfood (OpenOOD cfood_postprocessor, alpha=1)", ours("cfood", alpha=1.0, k=0.01),
           theirs(CFOODPostprocessor(cfg("cfood", alpha=1.0, k=0.01))))
    record("gram (OpenOOD gram_postprocessor, powers 1..5)", ours("gram"),
           theirs(GRAMPostprocessor(cfg("gram", powers=[1, 2, 3, 4, 5]))))
    import openood.postprocessors.gram_postprocessor as gram_module
    g_p = gram_module.G_p
    gram_module.G_p = lambda ob, p: g_p(ob.double(), p)          # the same code, in float64
    record("gram (the same, its G_p run in float64)", ours("gram"),
           theirs(GRAMPostprocessor(cfg("gram", powers=[1, 2, 3, 4, 5]))),
           "(the release's float32 Gram sums cancel where a conv map is signed; gradood sums in float64)")
    gram_module.G_p = g_p
    try:
        from openood.postprocessors.adascale_postprocessor import AdaScalePostprocessor
        from openood.networks.adascale_net import AdaScaleANet, AdaScaleLNet
    except ImportError as err:
        print(f"adascale: not compared ({err}; give --site with statsmodels)")
    else:
        for score, wrap in (("adascale_a", AdaScaleANet), ("adascale_l", AdaScaleLNet)):
            post = AdaScalePostprocessor(cfg(score, percentile=[75, 85], k1=5, k2=1, lmbda=10, o=0.05,
                                             num_samples=5000))
            wrapped = wrap(net)
            post.setup(wrapped, loaders, {})
            post.set_hyperparam([[75, 85], 5, 1, 10, 0.05])
            peer = np.concatenate([post.postprocess(wrapped, test[i:i + 50].clone())[1].double().numpy()
                                   for i in range(0, len(test), 50)])
            record(f"{score} (OpenOOD adascale_postprocessor)", ours(score), peer)
    try:
        import pytorch_ood
        from pytorch_ood.detector import WeightedEBO
    except ImportError as err:
        print(f"pytorch-ood: not compared ({err})")
    else:
        w = nn.Linear(10, 1)
        with torch.no_grad():
            w.weight.copy_(torch.linspace(-0.5, 2.0, 10)[None])
        path = os.path.join(work, "w.npy")
        np.save(path, w.weight.detach().numpy().ravel())
        with torch.no_grad():
            peer = -WeightedEBO(model, w.weight.detach()).predict(test).double().numpy()
        record(f"webo (pytorch-ood {pytorch_ood.__version__} WeightedEBO)", ours("webo", weights=path), peer)
    with open(os.path.join(ROOT, "bench", "peers.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| detector, peer code | max rel diff | median rel diff | max abs diff / score range | samples | note |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {k} | {v['max_rel']:.2e} | {v['median_rel']:.1e} | {v['max_abs_over_range']:.1e} | {v['n']} | "
              f"{v['note']} |" for k, v in rows.items()]
    with open(os.path.join(ROOT, "bench", "peers.md"), "w") as f:
        f.write("Per-sample agreement with the peers' own code on the demo classifier (`bench/peers.py`).\n\n"
                + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
