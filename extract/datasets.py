"""Reading datasets (ImageFolders, OpenOOD image lists, torchvision's CIFAR and SVHN
files) and the authors' evaluation transforms.

The presets' layouts under a data root are declared in ``store.benchmarks``. Every item
of an ``ImageSet`` is ``(image tensor, label, index, reason)``; ``reason`` is ``""`` for a
readable image and the decoder's error message for an unreadable one when ``skip_bad`` is
on (the tensor is then zeros and the label -1). Images are decoded to RGB by ``load_rgb``
(16-bit images scaled, not clipped).
"""
import os
import stat

import torch
from PIL import Image
from torchvision import datasets as tvd
from torchvision import transforms as T

from gradood.store.benchmarks import WHERE_TO_GET, WHERE_TO_GET_OPENOOD

# Evaluation transforms. CIFAR constants from GAIA's data/datasets.py; BiT ImageNet from
# GradNorm's test_ood.py (Resize 480x480, Normalize 0.5/0.5); torchvision models use their
# standard ImageNet evaluation transform.
PREPROCESS = {
    "cifar10": [("CenterCrop", 32), ("ToTensor",), ("Normalize", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))],
    "cifar100": [("CenterCrop", 32), ("ToTensor",), ("Normalize", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))],
    "imagenet_bit": [("Resize", (480, 480)), ("ToTensor",), ("Normalize", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
    "imagenet_tv": [("Resize", 256), ("CenterCrop", 224), ("ToTensor",), ("Normalize", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))],
    "demo": [("CenterCrop", 32), ("ToTensor",), ("Normalize", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
    # OpenOOD v1.5's test preprocessing (evaluation_api/preprocessor.py): bilinear Resize of
    # the shorter side, CenterCrop, its normalization_dict constants; ImageNet-200 and
    # ImageNet-1K use Resize 256 / CenterCrop 224 with the ImageNet constants (imagenet_tv).
    "openood_cifar10": [("Resize", 32), ("CenterCrop", 32), ("ToTensor",),
                        ("Normalize", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))],
    "openood_cifar100": [("Resize", 32), ("CenterCrop", 32), ("ToTensor",),
                         ("Normalize", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))],
    # gengandrew/Open_OOD (gradient tracking) feeds CIFAR images through ToTensor() alone
    "totensor": [("ToTensor",)],
    # one-channel models (MNIST, FashionMNIST, medical images): grey levels, 28 px, the
    # datasets' usual mean and std (torchvision's MNIST examples: 0.1307 / 0.3081;
    # FashionMNIST: 0.2860 / 0.3530)
    "mnist": [("Grayscale", 1), ("Resize", 28), ("CenterCrop", 28), ("ToTensor",), ("Normalize", (0.1307,), (0.3081,))],
    "fashion_mnist": [("Grayscale", 1), ("Resize", 28), ("CenterCrop", 28), ("ToTensor",),
                      ("Normalize", (0.2860,), (0.3530,))],
}
GRAYSCALE = ("mnist", "fashion_mnist")     # the presets that give one-channel inputs
# "timm": the model's own data config (timm.data.resolve_data_config): Resize of the
# shorter side to size / crop_pct with its interpolation, CenterCrop, its mean and std.
PRESETS_HELP = ", ".join(PREPROCESS) + ", timm (the timm model's data config)"


def timm_steps(model):
    """Preprocessing steps of a timm model's data config (see ``PRESETS_HELP``)."""
    try:
        from timm.data import resolve_data_config
    except ModuleNotFoundError:
        raise ValueError("--preprocess timm needs timm: pip install 'gradood[timm]'") from None
    cfg = resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    return [("Resize", int(size / cfg["crop_pct"]), cfg["interpolation"]), ("CenterCrop", size),
            ("ToTensor",), ("Normalize", tuple(cfg["mean"]), tuple(cfg["std"]))]


def build_transform(name, image_size=None, model=None):
    """Transform for preprocessing ``name``; returns (transform, JSON-able description).

    image_size overrides the crop/resize size (for small test models). model: the
    classifier, for ``timm`` (its data config).
    """
    if name == "timm":
        if model is None or not hasattr(model, "pretrained_cfg"):
            raise ValueError("--preprocess timm reads a timm model's data config: use it with "
                             "--arch timm:NAME")
        preset = timm_steps(model)
    elif name not in PREPROCESS:
        raise ValueError(f"unknown preprocessing {name!r}; choose one of: {PRESETS_HELP}")
    else:
        preset = PREPROCESS[name]
    steps = []
    for step in preset:
        if image_size and step[0] in ("CenterCrop", "Resize"):
            step = (step[0], (image_size, image_size) if isinstance(step[1], tuple) else image_size, *step[2:])
        steps.append(step)
    ops = []
    for kind, *args in steps:
        if kind == "Resize" and len(args) > 1:      # (size, interpolation name)
            args = [args[0], T.InterpolationMode(args[1])]
        ops.append(getattr(T, kind)(*args))
    description = {"name": name, "steps": [[kind, *args] for kind, *args in steps]}
    return T.Compose(ops), description


def expected_layout(kind, rel):
    if kind == "cifar10":
        return "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"
    if kind == "cifar100":
        return "cifar-100-python/{train,test,meta}"
    if kind == "svhn":
        return "test_32x32.mat"
    if kind == "list":
        return f"{rel} (lines 'relative/path label'), images under the images folder"
    return f"{rel}/<class folder>/<image files>  (torchvision ImageFolder)"


class ImageSet(torch.utils.data.Dataset):
    """Wraps a torchvision dataset: items ``(x, label, index, reason)``; keeps ``paths``
    (one per item) and ``root`` (the folder or list file the items come from)."""

    def __init__(self, base, paths, skip_bad=False, image_shape=None, root=""):
        self.base, self.paths, self.skip_bad = base, [storable_path(p) for p in paths], skip_bad
        self.image_shape = image_shape
        self.root = root
        self.ignored = {}      # {extension: count} of files a folder held that are not images

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            x, y = self.base[i]
            return x, y, i, ""
        except Exception as err:  # any decoder error: PIL, truncated files, OS errors
            if not self.skip_bad:
                raise RuntimeError(f"cannot read image {self.paths[i]}: {err}. Remove or "
                                   "replace it, or pass --skip-bad to record it as skipped") from err
            return torch.zeros(self.image_shape), -1, i, f"{type(err).__name__}: {err}"[:300]


def storable_path(path):
    """``path`` as valid UTF-8 text: bytes a file system name holds that are not UTF-8
    (decoded by Python as surrogates) are written as ``\\xNN`` escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def probe_shape(transform):
    """(C, H, W) of one image after ``transform``."""
    return tuple(transform(Image.new("RGB", (500, 500))).shape)


def load_rgb(path):
    """An image file as an RGB PIL image. 16-bit (``I;16``) and 32-bit integer images are
    scaled to 8 bits first (PIL's RGB conversion would clip them: a 16-bit PNG becomes
    nearly all white); float images are taken as [0, 1]."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr * 255.0 / top), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        import numpy as np
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


class ImageList(torch.utils.data.Dataset):
    """Images named in a list file, one ``relative/path [label]`` per line (OpenOOD's
    ``benchmark_imglist`` format), paths relative to ``images_root``, in list order.

    A missing label, or -1, means unlabelled (OOD lists). Blank lines are ignored; the
    path is everything before the last space-separated field when that field is an
    integer label, so paths with spaces are read whole.
    """

    def __init__(self, list_file, images_root, transform):
        self.list_file, self.root, self.transform = list_file, images_root, transform
        self.samples = []
        with open(list_file, "rb") as f:
            raw = f.read()
        if raw.startswith(b"\xef\xbb\xbf"):          # a UTF-8 byte-order mark is not part of a path
            raw = raw[3:]
        lines = []
        for number, data in enumerate(raw.split(b"\n"), 1):
            try:
                lines.append(data.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{list_file}:{number}: not UTF-8 text ({err.reason} at column "
                                 f"{err.start + 1}); save the list as UTF-8") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            if "\t" in line:
                raise ValueError(f"{list_file}:{number}: a tab separates the fields of {line!r}; write "
                                 "'relative/path label' with one space")
            rel, _, last = line.rpartition(" ")
            try:
                label = int(last)
            except ValueError:
                if rel and _is_number(last):
                    raise ValueError(f"{list_file}:{number}: label {last!r} is not an integer; write "
                                     "'relative/path label' with an integer class (or -1)") from None
                if rel and not os.path.exists(os.path.join(images_root, line)):
                    raise ValueError(f"{list_file}:{number}: {line!r} is not 'relative/path label': its "
                                     f"last field {last!r} is no integer label and {line!r} is no file "
                                     f"under {images_root}") from None
                rel, label = line, -1
            if not rel:
                rel, label = line, -1
            if " " in rel and not os.path.exists(os.path.join(images_root, rel)):
                first, _, middle = rel.rpartition(" ")
                while " " in first and not os.path.exists(os.path.join(images_root, first)):
                    first = first.rpartition(" ")[0]
                if os.path.exists(os.path.join(images_root, first)):
                    raise ValueError(f"{list_file}:{number}: {line!r} has {len(line[len(first):].split()) + 1} "
                                     f"fields; a list line is 'relative/path label', two fields: drop the "
                                     f"columns after the label")
            if os.path.isabs(rel):
                raise ValueError(f"{list_file}:{number}: absolute path {rel!r}; list paths are "
                                 "relative to the images folder")
            self.samples.append((os.path.join(images_root, rel), label))
        if not self.samples:
            raise FileNotFoundError(f"image list {list_file} names no images")
        self.targets = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(load_rgb(path)), label


IMAGE_EXTENSIONS = tvd.folder.IMG_EXTENSIONS


def _loops(path):
    """True when the folder ``path`` is a symlink to itself or to a folder above it (a loop)."""
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    above = os.path.realpath(os.path.dirname(path))
    return above == target or above.startswith(target.rstrip(os.sep) + os.sep)


def _walk_once(top):
    """``os.walk(top, followlinks=True)`` without symlink loops: a link to a folder above
    it (``self -> .``) is not entered, and no real folder is walked twice."""
    seen = set()
    for root, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not _loops(os.path.join(root, d))]
        yield root, dirs, files


def _regular_file(path):
    """True for a regular file (after symlinks); False for pipes, sockets, devices, broken links."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class ImageFolder(tvd.ImageFolder):
    """torchvision's ImageFolder (same classes, same row order) reading regular image
    files only and following no symlink loop: a named pipe called ``x.png`` is skipped
    instead of blocking the run, a link ``self -> .`` does not multiply the images."""

    def find_classes(self, directory):
        """Class folders of ``directory``, symlink loops left out."""
        classes = sorted(e.name for e in os.scandir(directory)
                         if e.is_dir() and not _loops(os.path.join(directory, e.name)))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        exts = tuple(e.lower() for e in (extensions or IMAGE_EXTENSIONS))
        instances, found = [], set()
        for target_class in sorted(class_to_idx):
            target_dir = os.path.join(directory, target_class)
            for root, _, fnames in sorted(_walk_once(target_dir)):
                for fname in sorted(fnames):
                    path = os.path.join(root, fname)
                    if fname.lower().endswith(exts) and _regular_file(path):
                        instances.append((path, class_to_idx[target_class]))
                        found.add(target_class)
        empty = set(class_to_idx) - found
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}. "
                                    f"Supported extensions are: {', '.join(exts)}")
        return instances


def ignored_files(root, classes):
    """``{extension: count}`` of the regular files in the class folders of ``root`` that an
    ImageFolder skips (extensions outside ``IMAGE_EXTENSIONS``, e.g. ``.gif``)."""
    out = {}
    exts = tuple(e.lower() for e in IMAGE_EXTENSIONS)
    for c in classes:
        for folder, _, files in _walk_once(os.path.join(root, c)):
            for f in files:
                if not f.lower().endswith(exts) and _regular_file(os.path.join(folder, f)):
                    ext = os.path.splitext(f)[1].lower() or "(none)"
                    out[ext] = out.get(ext, 0) + 1
    return out


def _folder(path, transform, name, data_root, kind, rel):
    """An ImageFolder at ``path`` with errors that say what is wrong."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"dataset {name!r} not found: no folder {path}.\n"
            f"Expected layout: {data_root or '.'}/{expected_layout(kind, rel)}\n{WHERE_TO_GET}")
    try:
        return ImageFolder(path, transform=transform, loader=load_rgb, allow_empty=False)
    except (FileNotFoundError, RuntimeError) as err:
        classes = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
        if not classes:
            raise FileNotFoundError(
                f"dataset {name!r}: folder {path} has no class sub-folders; put the images in "
                f"{path}/<class>/<image files> (one sub-folder is enough for an OOD set)") from None
        raise FileNotFoundError(
            f"dataset {name!r}: no image files in the class folders of {path} ({err}); "
            f"image extensions read: {', '.join(IMAGE_EXTENSIONS)}") from None


def open_dataset(data_root, kind, rel, transform, name, skip_bad=False, images_root=""):
    """Dataset ``name`` of kind ``folder``/``list``/``cifar10``/``cifar100``/``svhn`` as an
    ImageSet. ``list``: ``rel`` is an image-list file (absolute, or under ``data_root``)
    whose paths are relative to ``images_root`` (default ``data_root``); every listed image
    must exist (the error names the missing ones).

    Raises FileNotFoundError with the expected layout and where to get the files.
    """
    path = os.path.join(data_root, rel) if kind in ("folder", "list") else data_root
    if kind == "folder":
        base = _folder(path, transform, name, data_root, kind, rel)
        paths = [p for p, _ in base.samples]
        ds = ImageSet(base, paths, skip_bad, probe_shape(transform), root=path)
        ds.ignored = ignored_files(path, base.classes)
        return ds
    if kind == "list":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset {name!r}: image list {path} not found.\n{WHERE_TO_GET_OPENOOD}")
        base = ImageList(path, images_root or data_root, transform)
        absent = [p for p, _ in base.samples if not os.path.isfile(p)]
        if absent and not skip_bad:
            raise FileNotFoundError(
                f"dataset {name!r}: {len(absent)} of the {len(base)} images of {path} are missing, e.g. "
                f"{absent[0]} (list paths are relative to {images_root or data_root}).\n{WHERE_TO_GET_OPENOOD}")
        return ImageSet(base, [p for p, _ in base.samples], skip_bad, probe_shape(transform), root=path)
    try:
        if kind in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
            base = cls(path, train=(rel == "train"), transform=transform, download=False)
            paths = [f"{kind}:{rel}:{i}" for i in range(len(base))]
        elif kind == "svhn":
            base = tvd.SVHN(path, split=rel, transform=transform, download=False)
            paths = [f"svhn:{rel}:{i}" for i in range(len(base))]
        else:
            raise ValueError(f"unknown dataset kind {kind!r}")
    except (FileNotFoundError, RuntimeError) as err:
        raise FileNotFoundError(
            f"dataset {name!r} not found under data root {data_root!r} ({err}).\n"
            f"Expected layout: {data_root}/{expected_layout(kind, rel)}\n{WHERE_TO_GET}") from None
    return ImageSet(base, paths, skip_bad, probe_shape(transform), root=path)


def balanced_subset(labels, limit, seed=0):
    """Indices of at most ``limit`` samples with (nearly) equal counts per class, sorted.

    labels: sequence of ints. Classes are filled round-robin from a seeded permutation,
    so the same (labels, limit, seed) always gives the same subset.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(labels))
    pools = {int(c): (labels == c).nonzero().flatten()[torch.randperm(int((labels == c).sum()), generator=g)].tolist()
             for c in torch.unique(labels)}
    chosen = []
    while len(chosen) < limit and any(pools.values()):
        for c in sorted(pools):
            if pools[c] and len(chosen) < limit:
                chosen.append(pools[c].pop(0))
    return sorted(chosen)


def dataset_labels(ds):
    """Integer labels of an ImageSet's base dataset, without decoding images."""
    base = ds.base
    for attr in ("targets", "labels"):
        if hasattr(base, attr):
            return list(getattr(base, attr))
    raise ValueError("dataset has no labels")
