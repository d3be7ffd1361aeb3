"""Building a classifier from its name: the authors' layouts, torchvision, timm, a user's file.

An architecture is named in one of four ways (``--arch``, ``ARCH=``, ``ExtractConfig.arch``):
    NAME                 a layout of an author's release in this package (``BUILTIN``)
    torchvision:NAME     ``torchvision.models.get_model(NAME, weights=None, num_classes=K)``,
                         any classification model of ``torchvision.models``
    timm:NAME            ``timm.create_model(NAME, pretrained=False, num_classes=K)`` (the
                         optional extra ``gradood[timm]``)
    file:PATH.py:FUNC    ``FUNC(num_classes)`` of a user's Python file, returning an
                         ``nn.Module`` (``--model-file PATH.py:FUNC``)
The older names ``tv_resnet18``, ``tv_resnet50`` and ``tv_mobilenet_v2`` are aliases of the
torchvision names. Nothing is downloaded: weights always come from ``--checkpoint``. What
extraction needs to know of the built model (head, norms, stages, hook sets) is found on
the module itself (``extract.adapters``).
"""
import dataclasses
import hashlib
import importlib.util
import inspect
import os
import traceback
import types

import torch
import torch.nn as nn

from . import bit_resnetv2, cifar_resnet, densenet, resnet20, wide_resnet


def _bit(name):
    units, wf = bit_resnetv2.BIT_UNITS[name]
    return lambda num_classes: bit_resnetv2.ResNetV2(units, wf, num_classes)


def _wrn(depth, widen):
    return lambda num_classes: wide_resnet.WideResNet(depth, num_classes, widen_factor=widen)


# The authors' layouts: (builder, release it follows)
BUILTIN = {
    "resnet18": (cifar_resnet.resnet18, "GAIA networks/resnet.py (CIFAR)"),
    "resnet34": (cifar_resnet.resnet34, "GAIA networks/resnet.py (CIFAR)"),
    "resnet50": (cifar_resnet.resnet50, "GAIA networks/resnet.py (CIFAR)"),
    "resnet18_32x32": (cifar_resnet.ResNet18_32x32, "OpenOOD resnet18_32x32"),
    "resnet20": (resnet20.resnet20, "gengandrew/Open_OOD models/resnet.py ResNet20 (gradient tracking)"),
    "wrn_40_2": (_wrn(40, 2), "GAIA networks/wresnet.py"),
    "wrn_40_1": (_wrn(40, 1), "GAIA networks/wresnet.py"),
    "wrn_16_2": (_wrn(16, 2), "GAIA networks/wresnet.py"),
    "wrn_16_1": (_wrn(16, 1), "GAIA networks/wresnet.py"),
    "wrn_28_10": (_wrn(28, 10), "ODIN / Energy WideResNet-28-10 (same state-dict layout)"),
    "densenet_bc_100": (densenet.densenet_bc_100, "ODIN / Mahalanobis / Energy / DICE DenseNet-BC-100"),
    "BiT-S-R50x1": (_bit("BiT-S-R50x1"), "GradNorm / GAIA resnetv2.py (Big Transfer .npz readable)"),
    "BiT-S-R101x1": (_bit("BiT-S-R101x1"), "GradNorm / GAIA resnetv2.py (Big Transfer .npz readable)"),
}
ALIASES = {"tv_resnet18": "torchvision:resnet18", "tv_resnet50": "torchvision:resnet50",
           "tv_mobilenet_v2": "torchvision:mobilenet_v2"}
ARCH_HELP = ("torchvision:NAME, timm:NAME (gradood[timm]), --model-file FILE.py:FUNC, or a release "
             "layout: " + ", ".join(BUILTIN))


def canonical_arch(arch, model_file=None):
    """The recorded architecture name: aliases resolved; with ``model_file``
    (``PATH.py:FUNC``) ``file:<file name>:FUNC``."""
    if model_file:
        path, func = _split_model_file(model_file)
        return f"file:{os.path.basename(path)}:{func}"
    if not arch:
        raise ValueError("no architecture: give --arch (" + ARCH_HELP + ")")
    return ALIASES.get(arch, arch)


def _split_model_file(spec):
    path, sep, func = str(spec).rpartition(":")
    if not sep or not path.endswith(".py") or not func.isidentifier():
        raise ValueError(f"--model-file {spec!r}: expected FILE.py:FUNC, FUNC(num_classes) "
                         "returning an nn.Module")
    return path, func


def model_file_provenance(model_file):
    """``{"model_file": absolute path, "model_file_sha256": hex}`` of ``PATH.py:FUNC``."""
    path, _ = _split_model_file(model_file)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"model_file": os.path.abspath(path), "model_file_sha256": digest}


def _from_file(spec, num_classes):
    """``FUNC(num_classes)`` of the file ``PATH.py:FUNC``; every way it can fail (a syntax
    error, an import that fails, a FUNC of another signature, a FUNC that raises, a result
    that is no module) is a one-line ValueError naming the file, the function and the cause."""
    path, func = _split_model_file(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model-file {spec}: {path} not found")
    name = "gradood_model_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ValueError(f"--model-file {spec}: {path} line {err.lineno}: {err.msg} (a syntax error; "
                         "fix the file)") from None
    except Exception as err:
        raise ValueError(f"--model-file {spec}: importing {path} failed{_where(err, path)}: "
                         f"{type(err).__name__}: {err}") from None
    build = getattr(module, func, None)
    if not callable(build):
        raise ValueError(f"--model-file {spec}: {path} defines no function {func}")
    try:
        inspect.signature(build).bind(num_classes)
    except TypeError:
        raise ValueError(f"--model-file {spec}: {func} is called as {func}(num_classes), with the class count; "
                         f"its signature is {func}{inspect.signature(build)}: give it a num_classes "
                         "parameter") from None
    except ValueError:
        pass                            # no signature to read (a builtin): call it and see
    try:
        model = build(num_classes)
    except Exception as err:
        raise ValueError(f"--model-file {spec}: {func}({num_classes}) raised {type(err).__name__}"
                         f"{_where(err, path)}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model-file {spec}: {func}({num_classes}) returned "
                         f"{type(model).__name__}, not an nn.Module")
    return model


def _where(err, path):
    """`` at PATH line N``: the deepest frame of ``err`` in the file ``path``, or ""."""
    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(path)]
    return f" at {os.path.basename(path)} line {lines[-1]}" if lines else ""


def check_num_classes(outputs, num_classes, model_file=None):
    """Refuse a model whose head gives ``outputs`` logits when ``num_classes`` were asked
    for (a model file's FUNC that ignores its argument; labels and tables would disagree)."""
    if outputs != num_classes:
        raise ValueError(f"the model gives {outputs} logits per image, but --num-classes is {num_classes}"
                         + (f": {model_file}'s function must build its head from its num_classes argument, "
                            if model_file else ": ")
                         + f"or give --num-classes {outputs}")


def _torchvision(name, num_classes):
    import torchvision
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ValueError(f"unknown torchvision classification model {name!r}; choose one of: "
                         + ", ".join(names))
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _timm(name, num_classes):
    try:
        import timm
    except ModuleNotFoundError:
        raise ValueError("--arch timm:... needs timm: pip install 'gradood[timm]'") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def logits_of(output, key=None, classes=None):
    """The (N, K) logits in a model's ``output``: ``output`` itself when it is a tensor;
    with ``key`` (``--output``), ``output[key]`` (an integer index of a tuple or list, or a
    key of a dict, or an attribute of a dataclass or named tuple); otherwise the
    ``logits`` entry of a dict or dataclass (Hugging Face's classifiers), or the one
    (N, ``classes``) tensor of a tuple or list (OpenOOD's ``(logits, features)``). Raises
    ValueError naming what the output holds and the option, also when several tensors
    are (N, ``classes``)."""
    if torch.is_tensor(output):
        if key is not None:
            raise ValueError(f"--output {key}: the model returns one tensor {tuple(output.shape)}, the logits "
                             "themselves; leave --output out")
        return output
    fields = _fields(output)
    if key is not None:
        chosen = fields.get(int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else key)
        if chosen is None:
            raise ValueError(f"--output {key}: the model's {type(output).__name__} holds "
                             f"{_describe(fields)}; give one of those indices or keys")
    else:
        chosen = fields.get("logits")
        if chosen is None:
            fits = {k: v for k, v in fields.items() if torch.is_tensor(v) and v.dim() == 2
                    and (classes is None or v.shape[1] == classes)}
            if len({id(v) for v in fits.values()}) > 1:
                raise ValueError(f"the model returns a {type(output).__name__} holding {_describe(fits)}: more "
                                 f"than one could be the (N, {classes or 'K'}) logits; pick them with --output "
                                 "INDEX or KEY")
            chosen = next(iter(fits.values()), None)
        if chosen is None:
            raise ValueError(f"the model returns a {type(output).__name__} holding {_describe(fields)}, with no "
                             f"(N, {classes or 'K'}) logits among them: pick them with --output INDEX or KEY")
    if not torch.is_tensor(chosen) or chosen.dim() != 2:
        raise ValueError(f"--output {key}: {_describe({key: chosen})} is not (N, K) logits")
    return chosen


def _fields(output):
    """``{index or key: value}`` of a tuple, list, dict, dataclass or named tuple."""
    if isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        return dict(enumerate(output))
    if hasattr(output, "_fields"):                                      # named tuple
        return {**dict(enumerate(output)), **output._asdict()}
    if isinstance(output, dict):
        return dict(output)
    if dataclasses.is_dataclass(output):
        return {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    return {}


def _describe(fields):
    return ", ".join(f"{k}: {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}"
                     for k, v in fields.items()) or "nothing this tool reads"


def select_logits(model, key=None, classes=None):
    """Make ``model`` return its logits (``logits_of`` its output, ``key`` = ``--output``,
    ``classes`` = K) whatever its forward returns: the forward is wrapped on the instance,
    so module names, hooks and gradients are the model's own. Returns ``model``."""
    def forward(self, *args, **kwargs):
        return logits_of(type(self).forward(self, *args, **kwargs), key, classes)
    model.forward = types.MethodType(forward, model)
    return model


def build_model(arch, num_classes, model_file=None, output=None):
    """The classifier ``arch`` (see the module docstring) with a ``num_classes``-way head,
    randomly initialised, in eval mode, returning its (N, K) logits (``select_logits``,
    ``output`` = ``--output``). Unknown names list the valid ones."""
    if num_classes < 2:
        raise ValueError(f"--num-classes must be at least 2, got {num_classes}")
    arch = canonical_arch(arch, model_file)
    kind, sep, name = arch.partition(":")
    if model_file:
        model = _from_file(model_file, num_classes)
    elif sep and kind == "torchvision":
        model = _torchvision(name, num_classes)
    elif sep and kind == "timm":
        model = _timm(name, num_classes)
    elif sep and kind == "file":
        raise ValueError(f"--arch {arch}: give the file with --model-file PATH.py:FUNC")
    elif arch in BUILTIN:
        model = BUILTIN[arch][0](num_classes)
    else:
        raise ValueError(f"unknown architecture {arch!r}; use {ARCH_HELP}")
    return select_logits(model.eval(), output, num_classes)
