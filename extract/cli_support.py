"""The ``extract`` and ``demo`` commands' work, kept apart from the click declarations.

``pipeline.py`` parses options and turns score names into needs and passes
(``analyze.requirements``); everything here takes those as data and raises on bad input.
Messages for the user go through ``log``.
"""
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from gradood.store.benchmarks import TRAIN_SUFFIX, benchmark, train_cache_name
from gradood.store.reader import cache_path, default_cache_dir
from gradood.store.recipes import BATCH_SIZE, comparable, layers_of, missing
from gradood.store.schema import POLICIES, CacheError, differing, odin_name, odin_pairs, odin_pass
from gradood.store.writer import parts_dir, run_identity

from . import datasets as D
from .checkpoint import load_checkpoint
from .config import ODIN_DEFAULT, ExtractConfig, Provenance
from .distributed import init_shard
from .adapters import adapter_for
from .models import build_model, canonical_arch, model_file_provenance  # noqa: F401 (pipeline scores --arch)
from .runner import ExtractionPlan, cache_attrs, extract_to_cache, select_device


@dataclass
class ExtractRequest:
    """The extract command's options (``pipeline.py extract --help`` explains each)."""
    needs: list
    passes: tuple
    bench: Optional[str] = None
    datasets: tuple = ()
    data_root: Optional[str] = None
    arch: Optional[str] = None
    model_file: Optional[str] = None
    head: Optional[str] = None
    hook_sets: tuple = ()
    checkpoint: Optional[str] = None
    num_classes: Optional[int] = None
    preprocess: Optional[str] = None
    image_size: Optional[int] = None
    cache_dir: Optional[str] = None
    hooks: tuple = ()
    policy: str = "scores"
    store: tuple = ()
    odin: tuple = ()
    maha_fit: Optional[str] = None
    maha_magnitudes: tuple = ()
    maha_adversarial: bool = False
    split: str = "test"
    limit: Optional[int] = None
    balanced: bool = False
    batch_size: int = BATCH_SIZE
    device: str = "auto"
    skip_bad: bool = False
    dry_run: bool = False
    quiet: bool = False
    overwrite: bool = False
    scores: tuple = ()
    log: object = field(default=print, repr=False)


def parse_policies(items):
    """``{layer: policy}`` from ``LAYER=POLICY`` items."""
    out = {}
    for item in items:
        layer, sep, value = item.partition("=")
        if not sep or value not in POLICIES:
            raise ValueError(f"--store {item!r}: expected LAYER=POLICY with POLICY one of {', '.join(POLICIES)}")
        out[layer] = value
    return out


def parse_hook_sets(items):
    """``{set name: [module name or glob, ...]}`` from ``NAME=PATTERN[,PATTERN...]`` items."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        patterns = [p.strip() for p in value.split(",") if p.strip()]
        if not sep or not name or not patterns:
            raise ValueError(f"--hook-set {item!r}: expected NAME=MODULE[,MODULE...] with module "
                             "names or globs, e.g. bn='features.*.norm*'")
        out[name] = patterns
    return out


def parse_odin(items):
    """``[(T, epsilon, std_divided)]`` from ``T,EPS`` or ``T,EPS,std`` items."""
    passes = []
    for item in items:
        parts = [p.strip() for p in item.split(",")]
        try:
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "std"):
                raise ValueError
            t, eps = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"--odin {item!r}: expected T,EPS or T,EPS,std, e.g. 1000,0.0014 or "
                             "1000,0.0014,std (std: divide the sign gradient by the normalisation "
                             "std, as the original ODIN code and OpenOOD)") from None
        if t <= 0 or eps < 0:
            raise ValueError(f"--odin {item!r}: the temperature must be > 0 and epsilon >= 0")
        passes.append((t, eps, len(parts) == 3))
    return passes


class DatasetSpec(NamedTuple):
    """One dataset to extract: its cache name, kind (``store.benchmarks``), path, the data
    root it is relative to, and for image lists the folder their paths are relative to."""
    name: str
    kind: str
    rel: str
    root: str
    images: str = ""


def dataset_specs(bench, datasets, data_root, split):
    """``[DatasetSpec]`` for the requested datasets.

    ``NAME=DIR`` is an ImageFolder root; ``NAME=LIST.txt`` an image list whose paths are
    relative to ``--data-root``; with ``--split train`` the cache is named ``NAME_train``
    (the name analysis looks for). Preset names come from the benchmark; ``all`` is every
    set of it.
    """
    specs = []
    preset = benchmark(bench) if bench else None
    for item in datasets or (["all"] if preset else []):
        name, sep, folder = item.partition("=")
        if sep:
            if not name or not folder:
                raise ValueError(f"--dataset {item!r}: expected NAME=DIR or NAME=LIST.txt")
            if split == "train" and not name.endswith(TRAIN_SUFFIX):
                name = train_cache_name(name)
            if folder.lower().endswith((".txt", ".lst")):
                if not data_root:
                    raise ValueError(f"--dataset {item!r}: an image list needs --data-root, the folder "
                                     "its paths are relative to")
                specs.append(DatasetSpec(name, "list", os.path.abspath(folder), "", data_root))
            else:
                specs.append(DatasetSpec(name, "folder", folder, ""))
            continue
        if preset is None:
            raise ValueError(f"--dataset {item!r}: give NAME=DIR, or name a --benchmark preset")
        names = list(preset.sets) if name == "all" else [name]
        for n in names:
            if split == "train" and n == preset.id:
                n = train_cache_name(n)
            if n not in preset.sets:
                raise ValueError(f"unknown dataset {n!r} in benchmark {bench!r}; choose one of: "
                                 f"{', '.join(preset.sets)}, all")
            kind, rel, *images = preset.sets[n]
            specs.append(DatasetSpec(n, kind, rel, data_root, os.path.join(data_root, images[0]) if images else ""))
    if not specs:
        raise ValueError("no dataset given: use --dataset NAME=DIR (repeatable) or --benchmark")
    for spec in specs:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", spec.name) or spec.name.endswith(".h5"):
            raise ValueError(f"--dataset {spec.name!r}: a dataset name is a plain file stem (letters, "
                             "digits, _ . + -; no / or ..): it names <cache-dir>/<name>.h5")
    seen = {}
    for spec in specs:
        source = spec[1:]
        if spec.name in seen and seen[spec.name] != source:
            raise ValueError(f"--dataset: two different sources for {spec.name!r} ({seen[spec.name][1]} and "
                             f"{spec.rel}); give each dataset its own name")
        seen[spec.name] = source
    return list(dict.fromkeys(specs))


def _odin_std(description):
    for step in description["steps"]:
        if step[0] == "Normalize":
            return tuple(float(v) for v in step[2])
    return None


def _source(attrs, needs, passes, sets):
    """What a cache must share with a run to stand in for it: the model parts the needs
    read (``store.recipes.comparable``) among the hook sets ``sets`` (those the cache
    holds; the others are what it lacks) and the rows (data, split, subset, count)."""
    needs = [n for n in needs if layers_of(sets, n[0])]
    return {"model": comparable(attrs, needs, passes),
            **{k: attrs.get(k) for k in ("dataset", "dataset_root", "split", "subset", "n_samples")}}


def _lacks(old, needs, passes, odin):
    """What the complete cache ``old`` lacks for ``needs``, ``passes`` and the ODIN passes."""
    lacks = missing(needs, passes, old)
    if "odin" in passes:
        have = {tuple(p) for p in odin_pairs(old)}
        absent = [p for p in odin if tuple(p) not in have]
        if absent:
            lacks.append("ODIN passes " + ", ".join(odin_name(*p) for p in absent))
    return lacks


def check_existing(target, attrs, overwrite, log, needs=(), passes=(), scores=()):
    """Decide what to do with an existing cache file ``target`` for a run writing ``attrs``:
    True = skip it (it is complete and equal, or it comes from the same model and rows and
    holds everything ``needs`` and ``passes`` read, whatever else it holds); False =
    extract (after removing it with ``overwrite``); raises CacheError naming what it lacks
    or where it differs otherwise."""
    if not os.path.exists(target):
        if overwrite and os.path.isdir(parts_dir(target)):
            shutil.rmtree(parts_dir(target))
            log(f"{attrs['dataset']}: --overwrite: removed the unfinished run {parts_dir(target)}")
        return False
    if overwrite:
        os.remove(target)
        log(f"{attrs['dataset']}: --overwrite: removed {target}")
        return False
    from gradood.store.reader import CacheReader
    try:
        with CacheReader(target) as r:
            old = r.attrs
    except CacheError as err:
        raise CacheError(f"{target} exists but cannot be used ({err}); pass --overwrite to "
                         "re-extract it") from None
    diff = differing(run_identity(old), run_identity(attrs))
    if not diff:
        log(f"{attrs['dataset']}: {target} is complete and up to date (same model, data and plan); skipped")
        return True
    sets = old.get("hook_sets") or {}
    source = differing(_source(old, needs, passes, sets), _source(attrs, needs, passes, sets))
    lacks = [] if source else _lacks(old, needs, passes, odin_pairs(attrs))
    if not source and not lacks:
        log(f"{attrs['dataset']}: {target} already serves {', '.join(scores) or 'the requested scores'} "
            "(same model and images); skipped")
        return True
    why = (f"it comes from another model or other images (differing: {', '.join(source)})" if source
           else f"it lacks {'; '.join(lacks)}")
    raise CacheError(f"{target} exists and cannot serve {', '.join(scores) or 'this run'}: {why}; pass "
                     "--overwrite (make: OVERWRITE=1) to replace it, or choose another --cache-dir or "
                     "dataset name")


def extract_command(req):
    """Extract every requested dataset to the cache folder; see ``pipeline.py extract --help``."""
    preset = benchmark(req.bench) if req.bench else None
    arch = req.arch or (None if req.model_file or not preset else preset.arch)
    num_classes = req.num_classes or (preset.num_classes if preset else None)
    preprocess = req.preprocess or (preset.preprocess if preset else None)
    data_root = req.data_root or (os.path.join("data", req.bench) if req.bench else "")
    checkpoint = req.checkpoint or (preset.checkpoint if preset else None)
    missing = [n for n, v in (("--arch", arch or req.model_file), ("--num-classes", num_classes),
                              ("--preprocess", preprocess)) if not v]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give --benchmark)")
    if req.limit is not None and req.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {req.limit}")
    cache_dir = req.cache_dir or default_cache_dir(req.bench, arch or canonical_arch(None, req.model_file))
    arch = canonical_arch(arch, req.model_file)
    if req.maha_adversarial or req.maha_magnitudes:
        if not req.maha_fit:
            raise ValueError("--maha-magnitude and --maha-adversarial need --maha-fit TRAIN_CACHE")
    specs = dataset_specs(req.bench, req.datasets, data_root, req.split)
    shard, device = init_shard(req.device)
    dev = select_device(device)
    model = build_model(arch, num_classes, req.model_file)
    if checkpoint and (os.path.exists(checkpoint) or not req.dry_run):
        sha, weights = load_checkpoint(model, checkpoint)
    elif req.dry_run:
        sha, weights = "random-init", "random-init"
    else:
        raise ValueError("--checkpoint is required (a randomly initialised model is only allowed with --dry-run)")
    model.to(dev).eval().requires_grad_(False)
    transform, description = D.build_transform(preprocess, req.image_size, model)
    image_shape = D.probe_shape(transform)
    hook_sets = parse_hook_sets(req.hook_sets)
    adapter = adapter_for(model, image_shape, req.head, hook_sets)
    passes = tuple(req.passes) + (("mahalanobis",) if req.maha_fit and "mahalanobis" not in req.passes else ())
    maha = _maha_setup(adapter, weights, description, dev, req) if req.maha_fit else None
    config = ExtractConfig(arch=arch, head=req.head, hook_sets=hook_sets, needs=req.needs, passes=passes, hooks=tuple(req.hooks),
                           policy=req.policy, store=parse_policies(req.store),
                           odin=tuple(parse_odin(req.odin)) or tuple(
                               odin_pass(p) for p in (preset.odin if preset else ()))
                           or ODIN_DEFAULT,
                           odin_std=_odin_std(description), maha=maha, batch_size=req.batch_size,
                           device=str(dev), progress=not req.quiet)
    plan = ExtractionPlan(model, config, image_shape, dev, adapter)
    model_source = model_file_provenance(req.model_file) if req.model_file else {}
    for spec in specs:
        _extract_one(req, shard, model, plan, config, spec, transform, description,
                     checkpoint, sha, weights, cache_dir, dev, model_source)
    shard.close()


def _extract_one(req, shard, model, plan, config, spec, transform, description,
                 checkpoint, sha, weights, cache_dir, dev, model_source):
    log, name = req.log, spec.name
    if req.dry_run and spec.kind in ("folder", "list") and not os.path.exists(os.path.join(spec.root, spec.rel)):
        ds, n_images = None, req.limit or 0
    else:
        ds = D.open_dataset(spec.root, spec.kind, spec.rel, transform, name, req.skip_bad, spec.images)
        n_images = len(ds)
        if ds.ignored and shard.is_main:
            log(f"{name}: {sum(ds.ignored.values())} file(s) ignored, not image files: "
                + ", ".join(f"{n} {ext}" for ext, n in sorted(ds.ignored.items()))
                + f" (read: {', '.join(D.IMAGE_EXTENSIONS)})")
    indices = None
    if req.limit is not None and ds is not None:
        indices = (D.balanced_subset(D.dataset_labels(ds), req.limit) if req.balanced
                   else list(range(min(req.limit, len(ds)))))
        n_images = len(indices)
        if req.limit > len(ds) and shard.is_main:
            log(f"{name}: --limit {req.limit}, but the set has {len(ds)} images: taking all {len(ds)}")
    target = cache_path(cache_dir, name)
    if req.dry_run:
        if shard.is_main:
            log(f"{name}: {n_images} images -> {target}")
            log("\n".join("  " + line for line in plan.describe(n_images)))
        return
    source = ds.root
    provenance = Provenance(dataset=name, checkpoint=os.path.abspath(checkpoint), checkpoint_sha256=sha,
                            weights_sha256=weights, preprocess=description,
                            dataset_root=os.path.abspath(source),
                            split="train" if name.endswith(TRAIN_SUFFIX) else req.split,
                            subset={"limit": req.limit, "balanced": req.balanced}, benchmark=req.bench or "",
                            **model_source)
    attrs = cache_attrs(plan, provenance, n_images, dev, shard.world_size)
    if check_existing(target, attrs, req.overwrite and shard.is_main, log if shard.is_main else (lambda m: None),
                      config.needs, config.passes, req.scores):
        return
    if plan.maha and shard.is_main:
        log(f"{name}: the multi-layer Mahalanobis pass costs about {plan.maha_cost():.0f} forward-pass "
            f"equivalents per image ({n_images} images): expect the extraction to take about that many "
            "times a plain forward pass")
    start = time.time()
    try:
        extract_to_cache(model, ds, target, config, provenance, indices, plan, shard)
    except KeyboardInterrupt as err:
        how = str(err) or "interrupted"
        raise KeyboardInterrupt(f"{name}: {how}; the finished batches are kept in "
                                f"{parts_dir(target)}: rerun the same command to resume") from None
    if shard.is_main:
        skipped = _count_skipped(target)
        log(f"{name}: {n_images} images" + (f" ({skipped} skipped: unreadable)" if skipped else "")
            + f" in {time.time() - start:.1f} s -> {target} "
            f"({os.path.getsize(target) / max(n_images, 1) / 1024:.1f} KiB/image)")


def _count_skipped(path):
    from gradood.store.reader import CacheReader
    with CacheReader(path) as r:
        return int(r.attrs.get("n_skipped", 0))


def _maha_setup(adapter, weights, preprocess, device, req):
    """``{"gaussians", "recipe"}`` for the multi-layer Mahalanobis pass (extract.mahalanobis).

    The class means and precisions of the ``nac`` stage outputs (the adapter's, or the
    modules of ``--hook-set nac=...``) are fitted on the ``--maha-fit`` cache, which must
    come from the same weights and preprocessing.
    """
    from gradood.store.gaussian import fit_layer_gaussians
    from gradood.store.reader import CacheReader
    from gradood.store.schema import differing, identity

    from .mahalanobis import ADV_NOISE, RELEASE_MAGNITUDES, LayerGaussians
    layers = adapter.hook_set("nac")
    with CacheReader(req.maha_fit) as reader:
        diff = differing(identity(reader.attrs), {"weights": weights, "preprocess": preprocess},
                         ("weights", "preprocess"))
        if diff and weights != "random-init":
            raise ValueError(f"--maha-fit {req.maha_fit}: made with other {' and '.join(diff)} than "
                             "this extraction; use the training cache of the same model")
        fitted = fit_layer_gaussians(reader, layers)
        recipe = {"layers": layers, "magnitudes": [float(m) for m in req.maha_magnitudes or RELEASE_MAGNITUDES],
                  "fit_cache": os.path.abspath(req.maha_fit), "fit_fingerprint": reader.attrs["fingerprint"],
                  "fit_n": int(reader.n_samples), "adversarial": bool(req.maha_adversarial), "adv_noise": ADV_NOISE}
    return {"gaussians": LayerGaussians(fitted, device), "recipe": recipe}


def demo_command(data_root, checkpoint, cache_dir, device, batch_size, test_reads, train_reads, log=print, seed=0):
    """Build the demo data, train the classifier at first use, extract every demo set.

    test_reads, train_reads: ``(needs, passes)`` of the scores the test sets and the
    training cache serve (``analyze.requirements``). Returns the seconds of each stage:
    ``{"data", "train", "extract"}``. seed: the classifier's training seed (initialisation
    and data order) when it is trained here.
    """
    from .demo_data import build_demo_data
    from .train import accuracy, train_classifier
    times = {}
    t0 = time.time()
    build_demo_data(data_root)
    times["data"] = time.time() - t0
    log(f"demo data ready in {data_root} ({times['data']:.1f} s)")
    transform, _ = D.build_transform("demo")
    t0 = time.time()
    if not os.path.exists(checkpoint):
        torch.manual_seed(seed)
        model = build_model("resnet18", 10)
        train_set = D.open_dataset(data_root, "folder", "digits/train", transform, "digits_train")
        seconds = train_classifier(model, train_set, seed=seed)
        os.makedirs(os.path.dirname(checkpoint) or ".", exist_ok=True)
        torch.save(model.state_dict(), checkpoint + ".tmp")
        os.replace(checkpoint + ".tmp", checkpoint)
        log(f"trained the demo ResNet-18 (seed {seed}) in {seconds:.1f} s -> {checkpoint}")
    model = build_model("resnet18", 10)
    load_checkpoint(model, checkpoint)
    test_set = D.open_dataset(data_root, "folder", "digits/test", transform, "digits")
    log(f"demo classifier test accuracy: {100 * accuracy(model, test_set):.2f}% on {len(test_set)} digits")
    times["train"] = time.time() - t0
    t0 = time.time()
    sets = [n for n in benchmark("demo").sets if not n.endswith(TRAIN_SUFFIX)]
    common = dict(bench="demo", data_root=data_root, checkpoint=checkpoint, cache_dir=cache_dir,
                  batch_size=batch_size, device=device, log=log)
    extract_command(ExtractRequest(*test_reads, datasets=tuple(sets), **common))
    extract_command(ExtractRequest(*train_reads, datasets=("digits_train",), limit=1000, balanced=True, **common))
    times["extract"] = time.time() - t0
    return times
