"""The ``extract`` and ``demo`` commands' work, kept apart from the click declarations."""
import os
import time

import torch

from store.benchmarks import benchmark
from store.reader import cache_path

from . import datasets as D
from .checkpoint import load_checkpoint, sha256_of
from .models import build_model
from .distributed import init_shard
from .runner import ExtractionPlan, resolve_hooks, run_extraction, select_device


def _parse_policies(policy, overrides):
    policies = {"*": policy}
    for item in overrides:
        layer, sep, value = item.partition("=")
        if not sep or value not in ("scores", "pooled", "stats", "raw"):
            raise ValueError(f"--store {item!r}: expected LAYER=POLICY with POLICY one of scores, pooled, stats, raw")
        policies[layer] = value
    return policies


ODIN_DEFAULT = [(1000.0, 0.0014)]


def _parse_odin(items):
    pairs = []
    for item in items:
        try:
            t, eps = (float(v) for v in item.split(","))
        except ValueError:
            raise ValueError(f"--odin {item!r}: expected T,EPS, e.g. 1000,0.0014") from None
        pairs.append((t, eps))
    return pairs


def _dataset_specs(bench, datasets, data_root, split):
    """``[(name, kind, path relative to root, root)]`` for the requested datasets."""
    specs = []
    preset = benchmark(bench) if bench else None
    for item in datasets or (["all"] if preset else []):
        name, sep, folder = item.partition("=")
        if sep:
            specs.append((name, "folder", folder, ""))
            continue
        if preset is None:
            raise ValueError(f"--dataset {item!r}: give NAME=DIR, or name a --benchmark preset")
        names = list(preset["sets"]) if name == "all" else [name]
        for n in names:
            if split == "train" and n == preset["id"]:
                n = f"{n}_train"
            if n not in preset["sets"]:
                raise ValueError(f"unknown dataset {n!r} in benchmark {bench!r}; choose one of: "
                                 f"{', '.join(preset['sets'])}, all")
            kind, rel = preset["sets"][n]
            specs.append((n, kind, rel, data_root))
    if not specs:
        raise ValueError("no dataset given: use --dataset NAME=DIR (repeatable) or --benchmark")
    return specs


def extract_command(bench, datasets, data_root, arch, checkpoint, num_classes, preprocess,
                    image_size, cache_dir, hooks, scores, policy, store_overrides, split, limit,
                    balanced, batch_size, device, skip_bad, dry_run, quiet, odin_pairs=(),
                    maha_fit=None, maha_magnitudes=(), maha_adversarial=False):
    """Extract every requested dataset to ``cache_dir``; see ``pipeline.py extract --help``."""
    from pipeline import DEFAULT_SCORES, _default_cache_dir, _parse_scores
    preset = benchmark(bench) if bench else {}
    arch = arch or preset.get("arch")
    num_classes = num_classes or preset.get("num_classes")
    preprocess = preprocess or preset.get("preprocess")
    data_root = data_root or (os.path.join("data", bench) if bench else "")
    missing = [n for n, v in (("--arch", arch), ("--num-classes", num_classes), ("--preprocess", preprocess)) if not v]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give --benchmark)")
    cache_dir = cache_dir or _default_cache_dir(bench or "custom", arch)
    score_names = _parse_scores(scores) if scores else list(DEFAULT_SCORES)
    asked = {part for item in scores for part in item.split(",")}
    if not maha_fit and ("mahalanobis_ens" in asked or maha_magnitudes or maha_adversarial):
        raise ValueError("the multi-layer Mahalanobis ensemble needs --maha-fit TRAIN_CACHE (the "
                         "ID training cache, e.g. caches/<benchmark>-<arch>/<id>_train.h5)")
    maha_options = (maha_fit, tuple(maha_magnitudes), maha_adversarial)
    shard, device = init_shard(device)
    # On an error this rank exits without the final barrier; torchrun then stops the others.
    _extract_all(shard, bench, preset, datasets, data_root, arch, checkpoint, num_classes,
                 preprocess, image_size, cache_dir, hooks, score_names, policy, store_overrides,
                 split, limit, balanced, batch_size, device, skip_bad, dry_run, quiet, odin_pairs,
                 maha_options)
    shard.close()


def _extract_all(shard, bench, preset, datasets, data_root, arch, checkpoint, num_classes,
                 preprocess, image_size, cache_dir, hooks, score_names, policy, store_overrides,
                 split, limit, balanced, batch_size, device, skip_bad, dry_run, quiet, odin_pairs,
                 maha_options):
    dev = select_device(device)
    model = build_model(arch, num_classes)
    if checkpoint:
        sha = load_checkpoint(model, checkpoint)
    elif dry_run:
        sha = "random-init"
    else:
        raise ValueError("--checkpoint is required (a randomly initialised model is only allowed with --dry-run)")
    model.to(dev).requires_grad_(False)
    transform, description = D.build_transform(preprocess, image_size)
    image_shape = D._probe_shape(transform)
    hook_sets = resolve_hooks(model, arch, hooks, score_names)
    maha = _maha_setup(model, arch, sha, description, dev, *maha_options) if maha_options[0] else None
    plan = ExtractionPlan(model, arch, hook_sets, score_names, _parse_policies(policy, store_overrides),
                          image_shape, dev, _parse_odin(odin_pairs) or preset.get("odin") or ODIN_DEFAULT,
                          maha)
    for name, kind, rel, root in _dataset_specs(bench, datasets, data_root, split):
        if dry_run and kind == "folder" and not os.path.isdir(os.path.join(root, rel)):
            n_images = limit or 0
        else:
            ds = D.open_dataset(root, kind, rel, transform, name, skip_bad)
            n_images = len(ds)
        indices = None
        if limit is not None and not dry_run:
            indices = (D.balanced_subset(D.dataset_labels(ds), limit) if balanced
                       else list(range(min(limit, len(ds)))))
            n_images = len(indices)
        if dry_run:
            if not shard.is_main:
                continue
            print(f"{name}: {n_images} images -> {cache_path(cache_dir, name)}")
            print("\n".join("  " + line for line in plan.describe(n_images)))
            continue
        target = cache_path(cache_dir, name)
        if os.path.exists(target):
            if shard.is_main:
                print(f"{name}: {target} is complete; delete it to re-extract")
            continue
        meta = {"checkpoint": os.path.abspath(checkpoint), "checkpoint_sha256": sha,
                "preprocess": description, "dataset": name,
                "dataset_root": os.path.abspath(os.path.join(root, rel)) if kind == "folder" else os.path.abspath(root),
                "split": "train" if name.endswith("_train") else split,
                "subset": {"limit": limit, "balanced": balanced}}
        start = time.time()
        run_extraction(model, arch, ds, plan, target, meta, batch_size, dev, indices,
                       progress=not quiet, shard=shard)
        if shard.is_main:
            print(f"{name}: {n_images} images in {time.time() - start:.1f} s -> {target} "
                  f"({os.path.getsize(target) / max(n_images, 1) / 1024:.1f} KiB/image)")


def _maha_setup(model, arch, sha, preprocess, device, fit_cache, magnitudes, adversarial):
    """``{"gaussians", "recipe"}`` for the multi-layer Mahalanobis pass (extract.mahalanobis).

    The class means and precisions of the ``nac`` stage outputs are fitted on ``fit_cache``,
    which must come from the same checkpoint and preprocessing.
    """
    import json

    from analyze.feature_scores import fit_layer_gaussians
    from store.reader import CacheReader

    from .hooks import resolve_hook_set
    from .mahalanobis import ADV_NOISE, RELEASE_MAGNITUDES, LayerGaussians
    layers = resolve_hook_set(model, arch, "nac")
    with CacheReader(fit_cache) as reader:
        same = (reader.attrs["checkpoint_sha256"] == sha and
                json.dumps(reader.attrs["preprocess"], sort_keys=True) == json.dumps(preprocess, sort_keys=True))
        if not same and sha != "random-init":
            raise ValueError(f"--maha-fit {fit_cache}: made with another checkpoint or preprocessing "
                             "than this extraction; use the training cache of the same model")
        fitted = fit_layer_gaussians(reader, layers)
        recipe = {"layers": layers, "magnitudes": [float(m) for m in magnitudes or RELEASE_MAGNITUDES],
                  "fit_cache": os.path.abspath(fit_cache), "fit_fingerprint": reader.attrs["fingerprint"],
                  "fit_n": int(reader.n_samples), "adversarial": bool(adversarial), "adv_noise": ADV_NOISE}
    return {"gaussians": LayerGaussians(fitted, device), "recipe": recipe}


def demo_command(data_root, checkpoint, cache_dir, device, batch_size):
    """Build the demo data, train the classifier at first use, extract every demo set."""
    from .demo_data import build_demo_data
    from .train import accuracy, train_classifier
    t0 = time.time()
    build_demo_data(data_root)
    print(f"demo data ready in {data_root} ({time.time() - t0:.1f} s)")
    transform, _ = D.build_transform("demo")
    if not os.path.exists(checkpoint):
        torch.manual_seed(0)
        model = build_model("resnet18", 10)
        train_set = D.open_dataset(data_root, "folder", "digits/train", transform, "digits_train")
        seconds = train_classifier(model, train_set)
        os.makedirs(os.path.dirname(checkpoint) or ".", exist_ok=True)
        torch.save(model.state_dict(), checkpoint + ".tmp")
        os.replace(checkpoint + ".tmp", checkpoint)
        print(f"trained the demo ResNet-18 in {seconds:.1f} s -> {checkpoint}")
    model = build_model("resnet18", 10)
    load_checkpoint(model, checkpoint)
    test_set = D.open_dataset(data_root, "folder", "digits/test", transform, "digits")
    print(f"demo classifier test accuracy: {100 * accuracy(model, test_set):.2f}% on {len(test_set)} digits")
    sets = [n for n in benchmark("demo")["sets"] if not n.endswith("_train")]
    # Every score but gradient tracking (ten extra backward passes per batch would double
    # the demo's extraction time; `--score tracking` records it), with all statistics
    # (policy ``stats``) so sweeps can vary reductions; then a class-balanced 1000-image
    # training subset for the fitted scores.
    from analyze.scores import SCORES
    common = dict(bench="demo", data_root=data_root, arch="resnet18", checkpoint=checkpoint,
                  num_classes=10, preprocess="demo", image_size=None, cache_dir=cache_dir,
                  hooks=(), scores=(",".join(s for s in SCORES if s not in ("tracking", "mahalanobis_ens")),), policy="stats", store_overrides=(),
                  batch_size=batch_size, device=device, skip_bad=False, dry_run=False, quiet=False)
    extract_command(datasets=sets, split="test", limit=None, balanced=False, **common)
    extract_command(datasets=["digits_train"], split="test", limit=1000, balanced=True, **common)
