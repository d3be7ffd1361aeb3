"""The ``extract`` and ``demo`` commands' work, kept apart from the click declarations.

``pipeline.py`` builds an ``ExtractConfig`` from its options, with score names turned
into needs and passes (``analyze.requirements``); ``extract_command`` resolves the
preset's defaults, the model, the datasets (``dataset_specs``) and the extra passes'
settings and extracts each dataset, reusing caches by ``store.reuse``. It raises on bad
input; messages for the user go through ``log``.
"""
import os
import re
import time
from dataclasses import replace
from typing import NamedTuple

import torch

from gradood.store.benchmarks import TRAIN_SUFFIX, VAL_SUFFIX, benchmark, train_cache_name
from gradood.store.gaussian import fit_layer_gaussians
from gradood.store.reader import CacheReader, cache_path, default_cache_dir
from gradood.store.reuse import check_existing
from gradood.store.schema import differing, identity, odin_pass
from gradood.store.writer import parts_dir

from . import datasets as D
from .checkpoint import load_checkpoint
from .config import ODIN_DEFAULT, ExtractConfig, Provenance
from .demo_data import build_demo_data
from .distributed import init_shard
from .mahalanobis import ADV_NOISE, RELEASE_MAGNITUDES, LayerGaussians
from .adapters import adapter_for
from .models import build_model, canonical_arch, check_num_classes, model_file_provenance  # noqa: F401 (pipeline scores)
from .runner import ExtractionPlan, cache_attrs, extract_to_cache, select_device
from .train import accuracy, train_classifier


class DatasetSpec(NamedTuple):
    """One dataset to extract: its cache name, kind (``store.benchmarks``), path, the data
    root it is relative to, and for image lists the folder their paths are relative to."""
    name: str
    kind: str
    rel: str
    root: str
    images: str = ""
    optional: bool = False      # a csid set under --dataset all: reported, not fatal, when absent


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
            specs.append(DatasetSpec(n, kind, rel, data_root, os.path.join(data_root, images[0]) if images else "",
                                     optional=name == "all" and n in preset.csid))
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


def extraction_cost(model, adapter, image_shape, needs, passes):
    """``(objectives, bytes per image)`` of an extraction recording ``needs`` and ``passes``
    alone with the default settings (policy ``scores``, the default ODIN pass), from its
    plan (``ExtractionPlan.bytes_per_image``, before compression); None for a pass that
    needs more than the model (the Mahalanobis pass's ``--maha-fit`` cache)."""
    if "mahalanobis" in passes:
        return None
    # the std only scales the ODIN / iODIN step: a stand-in keeps the plan's sizes exact
    config = ExtractConfig(arch="-", needs=needs, passes=passes, odin_std=(1.0,) * image_shape[0], device="cpu")
    plan = ExtractionPlan(model, config, image_shape, torch.device("cpu"), adapter)
    return plan.objectives, plan.bytes_per_image()


def _odin_std(description):
    for step in description["steps"]:
        if step[0] == "Normalize":
            return tuple(float(v) for v in step[2])
    return None


def extract_command(config, log=print):
    """Extract every dataset of ``config`` (an ``ExtractConfig``) to its cache folder; see
    ``pipeline.py extract --help``. Messages for the user go through ``log``."""
    preset = benchmark(config.benchmark) if config.benchmark else None
    arch = config.arch or (None if config.model_file or not preset else preset.arch)
    num_classes = config.num_classes or (preset.num_classes if preset else None)
    preprocess = config.preprocess or (preset.preprocess if preset else None)
    data_root = config.data_root or (os.path.join("data", config.benchmark) if config.benchmark else "")
    checkpoint = config.checkpoint or (preset.checkpoint if preset else None)
    missing = [n for n, v in (("--arch", arch or config.model_file), ("--num-classes", num_classes),
                              ("--preprocess", preprocess)) if not v]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give --benchmark)")
    cache_dir = config.cache_dir or default_cache_dir(config.benchmark, arch or canonical_arch(None, config.model_file))
    arch = canonical_arch(arch, config.model_file)
    specs = dataset_specs(config.benchmark, config.datasets, data_root, config.split)
    shard, device = init_shard(config.device)
    dev = select_device(device)
    model = build_model(arch, num_classes, config.model_file, config.output)
    if checkpoint and (os.path.exists(checkpoint) or not config.dry_run):
        sha, weights = load_checkpoint(model, checkpoint)
    elif config.dry_run:
        sha, weights = "random-init", "random-init"
    else:
        raise ValueError("--checkpoint is required (a randomly initialised model is only allowed with --dry-run)")
    model.to(dev).eval().requires_grad_(False)
    transform, description = D.build_transform(preprocess, config.image_size, model)
    image_shape = D.probe_shape(transform)
    adapter = adapter_for(model, image_shape, config.head, config.hook_sets)
    check_num_classes(adapter.num_classes, num_classes, config.model_file)
    config = check_scores(config, adapter, log if shard.is_main else (lambda *_: None))
    maha = _maha_setup(adapter, weights, description, dev, config) if config.maha_fit else None
    config = replace(config, arch=arch, num_classes=num_classes, preprocess=preprocess, data_root=data_root,
                     checkpoint=checkpoint, cache_dir=cache_dir,
                     odin=config.odin or tuple(odin_pass(p) for p in (preset.odin if preset else ())) or ODIN_DEFAULT,
                     odin_std=_odin_std(description), maha=maha, device=str(dev))
    plan = ExtractionPlan(model, config, image_shape, dev, adapter)
    model_source = model_file_provenance(config.model_file) if config.model_file else {}
    for spec in specs:
        _extract_one(config, log, shard, model, plan, spec, transform, description, sha, weights, dev, model_source)
    shard.close()


def check_scores(config, adapter, log):
    """``config`` once its scores are checked against the model of ``adapter`` with
    ``config.refusals``: a named score the model cannot serve raises ValueError with the
    reason; the others (``config.optional``) it cannot serve are left out, named in one
    note per reason through ``log``, and the needs recomputed from ``config.score_needs``."""
    refused = config.refusals(adapter) if config.refusals else {}
    required = {name: reasons for name, reasons in refused.items() if name not in config.optional}
    if required:
        raise ValueError("; ".join(f"{name}: {reasons[0]}" for name, reasons in required.items())
                         + " (leave it out, or see `pipeline.py scores` for what this model serves)")
    if not refused:
        return config
    left_out = {}
    for name, reasons in refused.items():
        left_out.setdefault(reasons[0], []).append(name)
    for reason, names in left_out.items():
        log(f"note: left out of the extraction: {', '.join(names)}: {reason}")
    kept = [s for s in config.scores if s not in refused]
    needs = list(dict.fromkeys(n for s in kept for n in config.score_needs[s][0]))
    passes = tuple(dict.fromkeys(p for s in kept for p in config.score_needs[s][1]))
    maha_fit = config.maha_fit if "mahalanobis" in passes else None      # the ensemble left out: no pass
    return replace(config, needs=needs, passes=passes, scores=tuple(kept), refusals=None, score_needs={},
                   optional=(), maha_fit=maha_fit)


def input_shape(preprocess, image_size, model):
    """(C, H, W) of one preprocessed image: that of the ``preprocess`` preset (its
    ``image_size`` override applied), else a 3 x ``image_size`` x ``image_size`` input
    (default 224)."""
    if not preprocess:
        return (3, image_size or 224, image_size or 224)
    transform, _ = D.build_transform(preprocess, image_size, model)
    return D.probe_shape(transform)


def _check_class_folders(config, k, log, name, ds):
    """An ImageFolder set with more class folders than the ``k``-class head: refused for a
    labelled ID set (a ``_train``/``_val`` cache, the preset's ID sets), whose folder i must
    be class i; silent for a preset's OOD set; a note for a set of unknown role (an OOD
    set's labels are never read; analysis refuses such a cache as the ID set)."""
    classes = getattr(ds.base, "classes", None) or []
    if len(classes) <= k:
        return
    preset = benchmark(config.benchmark) if config.benchmark else None
    labelled = name.endswith((TRAIN_SUFFIX, VAL_SUFFIX)) or (preset and name in (preset.id, preset.val_id))
    text = (f"{name}: {len(classes)} class folders ({classes[0]} ... {classes[-1]}) under {ds.root}, "
            f"but the head has {k} classes")
    if not labelled and preset and name in preset.sets:
        return                          # a preset's OOD set: its labels are never read
    if labelled:
        raise ValueError(f"{text}: an ID set's class folders are the head's classes (folder i = class i); "
                         f"give the right --num-classes or a folder holding exactly {k} class folders")
    log(f"note: {text}; fine for an OOD set (its labels are never read), refused by analysis as an ID set")


def _note_missing_classes(log, name, ds, indices, k):
    """A note when the first ``len(indices)`` images of a training set (``--limit`` without
    ``--balanced``, folder order) leave classes of the ``k``-class head out."""
    try:
        labels = D.dataset_labels(ds)
    except ValueError:
        return
    present, held = {labels[i] for i in indices}, set(labels)
    absent = [c for c in range(k) if c not in present and c in held]
    if absent:
        log(f"note: {name}: the first {len(indices)} images in folder order hold no image of class(es) "
            f"{', '.join(map(str, absent[:10]))}{' ...' if len(absent) > 10 else ''}; add --balanced for the "
            "same number from every class")


def _subset(config, ds):
    """The recorded subset: ``{"limit", "balanced"}`` as run; a limit that takes every image
    of the set is no limit (the rows are the whole set, whatever number was given)."""
    whole = config.limit is None or ds is None or config.limit >= len(ds)
    return {"limit": None if whole else config.limit, "balanced": bool(config.balanced and not whole)}


def _extract_one(config, log, shard, model, plan, spec, transform, description, sha, weights, dev, model_source):
    name, checkpoint, cache_dir = spec.name, config.checkpoint, config.cache_dir
    if config.dry_run and spec.kind in ("folder", "list") and not os.path.exists(os.path.join(spec.root, spec.rel)):
        ds, n_images = None, config.limit or 0
    else:
        try:
            ds = D.open_dataset(spec.root, spec.kind, spec.rel, transform, name, config.skip_bad, spec.images)
        except FileNotFoundError as err:
            if not spec.optional:
                raise
            if shard.is_main:
                log(f"note: {name}, a covariate-shifted ID set (the full-spectrum tables, analyze --csid), is "
                    f"left out: {err}\nThe standard tables do not need it.")
            return
        n_images = len(ds)
        _check_class_folders(config, plan.num_classes, log if shard.is_main else (lambda m: None), name, ds)
        if ds.ignored and shard.is_main:
            log(f"{name}: {sum(ds.ignored.values())} file(s) ignored, not image files: "
                + ", ".join(f"{n} {ext}" for ext, n in sorted(ds.ignored.items()))
                + f" (read: {', '.join(D.IMAGE_EXTENSIONS)})")
    indices = None
    if config.limit is not None and ds is not None:
        indices = (D.balanced_subset(D.dataset_labels(ds), config.limit) if config.balanced
                   else list(range(min(config.limit, len(ds)))))
        n_images = len(indices)
        if not config.balanced and name.endswith(TRAIN_SUFFIX) and shard.is_main:
            _note_missing_classes(log, name, ds, indices, plan.num_classes)
        if config.limit > len(ds) and shard.is_main:
            log(f"{name}: --limit {config.limit}, but the set has {len(ds)} images: taking all {len(ds)}")
    target = cache_path(cache_dir, name)
    if config.dry_run:
        if shard.is_main:
            log(f"{name}: {n_images} images -> {target}")
            log("\n".join("  " + line for line in plan.describe(n_images)))
        return
    source = ds.root
    provenance = Provenance(dataset=name, checkpoint=os.path.abspath(checkpoint), checkpoint_sha256=sha,
                            weights_sha256=weights, preprocess=description,
                            dataset_root=os.path.abspath(source),
                            split="train" if name.endswith(TRAIN_SUFFIX) else config.split,
                            subset=_subset(config, ds), benchmark=config.benchmark or "",
                            **model_source)
    attrs = cache_attrs(plan, provenance, n_images, dev, shard.world_size)
    if check_existing(target, attrs, config.overwrite and shard.is_main, log if shard.is_main else (lambda m: None),
                      config.needs, config.passes, config.scores):
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
    with CacheReader(path) as r:
        return int(r.attrs.get("n_skipped", 0))


def _maha_setup(adapter, weights, preprocess, device, config):
    """``{"gaussians", "recipe"}`` for the multi-layer Mahalanobis pass (extract.mahalanobis).

    The class means and precisions of the ``nac`` stage outputs (the adapter's, or the
    modules of ``--hook-set nac=...``) are fitted on the ``--maha-fit`` cache, which must
    come from the same weights and preprocessing.
    """
    layers = adapter.hook_set("nac")
    with CacheReader(config.maha_fit) as reader:
        diff = differing(identity(reader.attrs), {"weights": weights, "preprocess": preprocess},
                         ("weights", "preprocess"))
        if diff and weights != "random-init":
            raise ValueError(f"--maha-fit {config.maha_fit}: made with other {' and '.join(diff)} than "
                             "this extraction; use the training cache of the same model")
        fitted = fit_layer_gaussians(reader, layers)
        recipe = {"layers": layers, "magnitudes": [float(m) for m in config.maha_magnitudes or RELEASE_MAGNITUDES],
                  "fit_cache": os.path.abspath(config.maha_fit), "fit_fingerprint": reader.attrs["fingerprint"],
                  "fit_n": int(reader.n_samples), "adversarial": bool(config.maha_adversarial), "adv_noise": ADV_NOISE}
    return {"gaussians": LayerGaussians(fitted, device), "recipe": recipe}


def demo_command(data_root, checkpoint, cache_dir, device, batch_size, test_reads, train_reads, log=print, seed=0):
    """Build the demo data, train the classifier at first use, extract every demo set.

    test_reads, train_reads: ``(needs, passes)`` of the scores the test sets and the
    training cache serve (``analyze.requirements``). Returns the seconds of each stage:
    ``{"data", "train", "extract"}``. seed: the classifier's training seed (initialisation
    and data order) when it is trained here.
    """
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
    common = dict(benchmark="demo", data_root=data_root, checkpoint=checkpoint, cache_dir=cache_dir,
                  batch_size=batch_size, device=device)
    extract_command(ExtractConfig(needs=test_reads[0], passes=test_reads[1], datasets=tuple(sets), **common), log)
    extract_command(ExtractConfig(needs=train_reads[0], passes=train_reads[1], datasets=("digits_train",),
                                  limit=1000, balanced=True, **common), log)
    times["extract"] = time.time() - t0
    return times
