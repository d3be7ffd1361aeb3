"""Benchmark presets: dataset names, layouts under the data root, defaults.

Torch-free, so both stages agree on names. Each set is ``(kind, relative path)``; kinds:
``folder`` (torchvision ImageFolder), ``cifar10``/``cifar100`` (torchvision's python
pickles, split ``test``/``train``), ``svhn`` (``test_32x32.mat``).
"""

# ODIN (temperature, epsilon): the ODIN paper's CIFAR setting; for ImageNet the GradNorm /
# MOS releases run ODIN with T=1000 and no input perturbation (epsilon 0).
ODIN_CIFAR = [(1000.0, 0.0014)]
ODIN_IMAGENET = [(1000.0, 0.0)]

# Score parameters that differ by benchmark, as the releases set them: ASH-S at
# percentile 95 in the ASH release's CIFAR configs (90, the entry's default, for ImageNet).
CIFAR_SCORE_PARAMS = {"ash": {"percentile": 95.0}}


def _cifar(name, num_classes):
    """CIFAR-10/100 preset: torchvision test/train splits and the ODIN/GAIA OOD folders."""
    return {
        "id": name, "preprocess": name, "arch": "resnet18", "num_classes": num_classes,
        "odin": ODIN_CIFAR, "score_params": CIFAR_SCORE_PARAMS,
        "sets": {name: (name, "test"), f"{name}_train": (name, "train"),
                 "SVHN": ("svhn", "test"), "LSUN": ("folder", "LSUN"),
                 "LSUN_resize": ("folder", "LSUN_resize"), "iSUN": ("folder", "iSUN"),
                 "Imagenet": ("folder", "Imagenet"), "Imagenet_resize": ("folder", "Imagenet_resize"),
                 "Places": ("folder", "Places"), "Textures": ("folder", "textures/images")},
    }


# Benchmarks: ID test set, ID training set, OOD sets; each entry is (kind, relative path).
BENCHMARKS = {
    "demo": {
        "id": "digits", "preprocess": "demo", "arch": "resnet18", "num_classes": 10,
        "checkpoint": "checkpoints/demo_resnet18.pt",
        "odin": ODIN_CIFAR, "score_params": CIFAR_SCORE_PARAMS,
        "sets": {"digits": ("folder", "digits/test"), "digits_train": ("folder", "digits/train"),
                 "photo_patches": ("folder", "photo_patches"), "textures": ("folder", "textures"),
                 "noise": ("folder", "noise"), "shapes": ("folder", "shapes"),
                 "mashups": ("folder", "mashups")},
    },
    "cifar10": _cifar("cifar10", 10),
    "cifar100": _cifar("cifar100", 100),
    "imagenet": {
        "id": "imagenet", "preprocess": "imagenet_bit", "arch": "BiT-S-R101x1", "num_classes": 1000,
        "odin": ODIN_IMAGENET,
        "sets": {"imagenet": ("folder", "imagenet/val"), "imagenet_train": ("folder", "imagenet/train"),
                 "iNaturalist": ("folder", "iNaturalist"), "SUN": ("folder", "SUN"),
                 "Places": ("folder", "Places"), "Textures": ("folder", "textures/images")},
    },
}

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


def ood_sets(name):
    """OOD set names of preset ``name``, in table order (ID test and training sets excluded)."""
    preset = benchmark(name)
    return [s for s in preset["sets"] if s != preset["id"] and not s.endswith("_train")]


def preset_params(attrs):
    """``{score: {parameter: value}}`` defaults of the benchmark a cache was extracted for
    (its ``benchmark`` attribute; empty for custom datasets)."""
    return dict(BENCHMARKS.get(attrs.get("benchmark") or "", {}).get("score_params", {}))
