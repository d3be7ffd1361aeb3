"""Benchmark presets: dataset names, layouts under the data root, groups, defaults.

Torch-free, so both stages agree on names. Each set is ``(kind, relative path)`` or, for
image lists, ``("list", list file, images folder)``, paths relative to the data root;
kinds: ``folder`` (torchvision ImageFolder), ``list`` (an image list: lines
``relative/path label``, paths relative to the images folder, read in list order; the
OpenOOD v1.5 layout), ``cifar10``/``cifar100`` (torchvision's python pickles, split
``test``/``train``), ``svhn`` (``test_32x32.mat``).

A preset may group its OOD sets (``groups``: near and far OOD, averaged per group in the
tables) and name validation caches (``val``: the ID validation set and the OOD
validation set that ``analyze --tune-on`` selects hyperparameters on). Names ending in
``_train`` or ``_val`` are never OOD test sets.
"""

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from .recipes import ODIN_DEFAULT


def _frozen(value):
    """``value`` with every dict a read-only mapping and every list a tuple."""
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


TRAIN_SUFFIX, VAL_SUFFIX = "_train", "_val"


def train_cache_name(id_name):
    """Name of the ID training cache of ID test set ``id_name``: ``<id>_train``."""
    return id_name + TRAIN_SUFFIX


def val_cache_name(id_name):
    """Name of the ID validation cache of ID test set ``id_name``: ``<id>_val``."""
    return id_name + VAL_SUFFIX


@dataclass(frozen=True)
class Benchmark:
    """One benchmark preset (read-only).

    id: the ID test set; sets: ``{name: (kind, relative path[, images folder])}``;
    preprocess, arch, num_classes, checkpoint: the extraction defaults; odin: the ODIN
    passes ``(T, epsilon[, std_divided])``; score_params: ``{score: {parameter: value}}``
    the releases set for this benchmark; groups: ``{"near": (set, ...), "far": (...)}`` or
    None; val_id / val_ood: the ID and OOD validation caches of ``--tune-on`` or None;
    openood: laid out as OpenOOD v1.5's image lists; csid: the covariate-shifted ID sets
    (images of the ID classes under another distribution, labelled), counted as
    in-distribution in full-spectrum OOD (``analyze --csid``) and never OOD sets.
    """
    id: str
    preprocess: str
    arch: str
    num_classes: int
    sets: Mapping
    odin: tuple = ()
    score_params: Mapping = field(default_factory=dict)
    checkpoint: Optional[str] = None
    groups: Optional[Mapping] = None
    val_id: Optional[str] = None
    val_ood: Optional[str] = None
    openood: bool = False
    csid: tuple = ()

    def __post_init__(self):
        for name in ("sets", "odin", "score_params", "groups", "csid"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))


# ODIN (temperature, epsilon): the ODIN paper's CIFAR setting; for ImageNet the GradNorm /
# MOS releases run ODIN with T=1000 and no input perturbation (epsilon 0).
ODIN_CIFAR = [ODIN_DEFAULT]
ODIN_IMAGENET = [(1000.0, 0.0)]

# Score parameters that differ by benchmark, as the releases set them: ASH-S at
# percentile 95 in the ASH release's CIFAR configs (90, the entry's default, for ImageNet).
CIFAR_SCORE_PARAMS = {"ash": {"percentile": 95.0}}


def _cifar(name, num_classes):
    """CIFAR-10/100 preset: torchvision test/train splits and the ODIN/GAIA OOD folders."""
    return Benchmark(
        id=name, preprocess=name, arch="resnet18", num_classes=num_classes,
        odin=ODIN_CIFAR, score_params=CIFAR_SCORE_PARAMS,
        sets={name: (name, "test"), train_cache_name(name): (name, "train"),
              "SVHN": ("svhn", "test"), "LSUN": ("folder", "LSUN"),
              "LSUN_resize": ("folder", "LSUN_resize"), "iSUN": ("folder", "iSUN"),
              "Imagenet": ("folder", "Imagenet"), "Imagenet_resize": ("folder", "Imagenet_resize"),
              "Places": ("folder", "Places"), "Textures": ("folder", "textures/images")})


def _openood(bench, num_classes, arch, preprocess, near, far, val_ood, id_dir, score_params=None, csid=()):
    """OpenOOD v1.5 preset (``openood/evaluation_api/datasets.py`` DATA_INFO): lists under
    ``benchmark_imglist/<bench>/``, images under ``images_classic/`` or
    ``images_largescale/`` as its download script lays them out. csid: ``[(name, list file
    name)]`` of its covariate-shifted ID sets, images in ``id_dir``."""
    lists = f"benchmark_imglist/{bench}"

    def entry(file, folder):
        return ("list", f"{lists}/{file}", folder)
    sets = {bench: entry(f"test_{bench}.txt", id_dir), train_cache_name(bench): entry(f"train_{bench}.txt", id_dir),
            val_cache_name(bench): entry(f"val_{bench}.txt", id_dir)}
    for name, folder in [*near, *far]:
        sets[name] = entry(f"test_{name}.txt", folder)
    sets[val_cache_name(val_ood[0])] = entry(f"val_{val_ood[0]}.txt", val_ood[1])
    for name, file in csid:
        sets[name] = entry(file, id_dir)
    return Benchmark(id=bench, preprocess=preprocess, arch=arch, num_classes=num_classes,
                     odin=[(*ODIN_DEFAULT, True)], score_params=score_params or {}, sets=sets,
                     groups={"near": [n for n, _ in near], "far": [n for n, _ in far]},
                     val_id=val_cache_name(bench), val_ood=val_cache_name(val_ood[0]), openood=True,
                     csid=tuple(n for n, _ in csid))


CLASSIC, LARGE = "images_classic", "images_largescale"
_CIFAR_FAR = [("mnist", CLASSIC), ("svhn", CLASSIC), ("texture", CLASSIC), ("places365", CLASSIC)]
_IMAGENET_NEAR = [("ssb_hard", LARGE), ("ninco", LARGE)]
_IMAGENET_FAR = [("inaturalist", LARGE), ("textures", CLASSIC), ("openimage_o", LARGE)]

# Benchmarks: ID test set, ID training set, OOD sets; each entry is (kind, relative path).
BENCHMARKS = {
    "demo": Benchmark(
        id="digits", preprocess="demo", arch="resnet18", num_classes=10,
        checkpoint="checkpoints/demo_resnet18.pt", odin=ODIN_CIFAR, score_params=CIFAR_SCORE_PARAMS,
        sets={"digits": ("folder", "digits/test"), "digits_train": ("folder", "digits/train"),
              "photo_patches": ("folder", "photo_patches"), "textures": ("folder", "textures"),
              "noise": ("folder", "noise"), "shapes": ("folder", "shapes"),
              "mashups": ("folder", "mashups")},
        groups={"near": ["mashups"], "far": ["photo_patches", "textures", "noise", "shapes"]}),
    "cifar10": _cifar("cifar10", 10),
    "cifar100": _cifar("cifar100", 100),
    # GAIA's ImageNet command passes -hook before_head to GAIA-Z too (hook.py: the block4
    # GroupNorms, then the pooled before_head output; its Textures row ends at before_head.gn
    # instead: --param gaia_z.hooks=before_head_gn)
    "imagenet": Benchmark(
        id="imagenet", preprocess="imagenet_bit", arch="BiT-S-R101x1", num_classes=1000, odin=ODIN_IMAGENET,
        score_params={"dice": {"p": 70.0}, "gaia_z": {"hooks": "before_head"}},
        sets={"imagenet": ("folder", "imagenet/val"), "imagenet_train": ("folder", "imagenet/train"),
              "iNaturalist": ("folder", "iNaturalist"), "SUN": ("folder", "SUN"),
              "Places": ("folder", "Places"), "Textures": ("folder", "textures/images")}),
}

# Covariate-shifted ID sets, as OpenOOD v1.5's DATA_INFO names them and their image lists
# (the csid "datasets" it evaluates). Its CIFAR-100 entry lists none (no CIFAR-100-C list
# ships with v1.5), so openood_cifar100 has none either.
_CSID = {"cifar10": [("cifar10c", "test_cifar10c.txt")],
         "cifar100": [],
         "imagenet200": [(f"imagenet_{v}", f"test_imagenet200_{v}.txt") for v in ("v2", "c", "r")],
         "imagenet": [(f"imagenet_{v}", f"test_imagenet_{v}.txt") for v in ("v2", "c", "r")]}

BENCHMARKS.update({
    "openood_cifar10": _openood("cifar10", 10, "resnet18_32x32", "openood_cifar10",
                                [("cifar100", CLASSIC), ("tin", CLASSIC)], _CIFAR_FAR, ("tin", CLASSIC), CLASSIC,
                                CIFAR_SCORE_PARAMS, _CSID["cifar10"]),
    "openood_cifar100": _openood("cifar100", 100, "resnet18_32x32", "openood_cifar100",
                                 [("cifar10", CLASSIC), ("tin", CLASSIC)], _CIFAR_FAR, ("tin", CLASSIC), CLASSIC,
                                 CIFAR_SCORE_PARAMS, _CSID["cifar100"]),
    "openood_imagenet200": _openood("imagenet200", 200, "torchvision:resnet18", "imagenet_tv", _IMAGENET_NEAR,
                                    _IMAGENET_FAR, ("openimage_o", LARGE), LARGE, csid=_CSID["imagenet200"]),
    "openood_imagenet": _openood("imagenet", 1000, "torchvision:resnet50", "imagenet_tv", _IMAGENET_NEAR,
                                 _IMAGENET_FAR, ("openimage_o", LARGE), LARGE, {"dice": {"p": 70.0}},
                                 _CSID["imagenet"]),
})
BENCHMARKS = MappingProxyType(BENCHMARKS)     # presets are read-only

WHERE_TO_GET_OPENOOD = (
    "OpenOOD v1.5 data: its download script (scripts/download/download.py in "
    "Jingkang50/OpenOOD, or the evaluation API's download) puts benchmark_imglist/, "
    "images_classic/ and images_largescale/ under one folder: give that folder as "
    "--data-root. ImageNet-1K training images come from the ImageNet site. This tool never "
    "downloads data.")

WHERE_TO_GET = (
    "CIFAR-10/100: the python versions from the CIFAR page (cifar-10-python.tar.gz, "
    "cifar-100-python.tar.gz), unpacked in the data root. SVHN: test_32x32.mat. LSUN, "
    "LSUN_resize, iSUN, Imagenet, Imagenet_resize: the ODIN release's OOD sets "
    "(facebookresearch/odin README). Places, Textures (DTD, folder textures/images), "
    "iNaturalist, SUN: the subsets linked in the GradNorm / MOS READMEs "
    "(deeplearning-wisc/gradnorm_ood). This tool never downloads data.")




def benchmark(name):
    """Preset ``name``; unknown names list the valid ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def is_fitting_or_validation(name):
    """True for cache names that are never OOD test sets (``*_train``, ``*_val``)."""
    return name.endswith(TRAIN_SUFFIX) or name.endswith(VAL_SUFFIX)


def ood_sets(name):
    """OOD test set names of preset ``name``, in table order (near then far when grouped)."""
    preset = benchmark(name)
    if preset.groups:
        return [*preset.groups["near"], *preset.groups["far"]]
    return [s for s in preset.sets if s != preset.id and not is_fitting_or_validation(s) and s not in preset.csid]


def csid_of(attrs):
    """The covariate-shifted ID sets of the benchmark a cache was extracted for (its
    ``benchmark`` attribute), or ()."""
    preset = BENCHMARKS.get(attrs.get("benchmark") or "")
    return tuple(preset.csid) if preset else ()


def groups_of(attrs):
    """``{"near": [...], "far": [...]}`` of the benchmark a cache was extracted for, or None."""
    preset = BENCHMARKS.get(attrs.get("benchmark") or "")
    return preset.groups if preset else None


def preset_params(attrs, params=None):
    """``{score: {parameter: value}}``: the score defaults of the benchmark a cache was
    extracted for (its ``benchmark`` attribute; none for custom datasets), updated by
    ``params`` (``{score: {parameter: value}}``, which win)."""
    bench = BENCHMARKS.get(attrs.get("benchmark") or "")
    preset = bench.score_params if bench else {}
    params = params or {}
    return {s: {**preset.get(s, {}), **params.get(s, {})} for s in {*preset, *params}}
