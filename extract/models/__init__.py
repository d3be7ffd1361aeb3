"""Model zoo: architectures with the state-dict layouts of the authors' releases.

``build_model(arch, num_classes)`` returns an ``nn.Module`` in eval mode;
``head_module(model)`` returns its final linear layer (``nn.Linear`` or a 1x1 ``nn.Conv2d``)
whose input is the pooled penultimate vector.
"""
import torch.nn as nn

from . import bit_resnetv2, cifar_resnet, wide_resnet


def _torchvision(name):
    def build(num_classes):
        import torchvision
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        model.head_name = "fc" if name.startswith("resnet") else "classifier.1"
        return model
    return build


def _bit(name):
    units, wf = bit_resnetv2.BIT_UNITS[name]
    return lambda num_classes: bit_resnetv2.ResNetV2(units, wf, num_classes)


ARCHITECTURES = {
    "resnet18": cifar_resnet.resnet18,
    "resnet34": cifar_resnet.resnet34,
    "resnet50": cifar_resnet.resnet50,
    "resnet18_32x32": cifar_resnet.ResNet18_32x32,
    "wrn_40_2": wide_resnet.wrn_40_2,
    "BiT-S-R50x1": _bit("BiT-S-R50x1"),
    "BiT-S-R101x1": _bit("BiT-S-R101x1"),
    "tv_resnet18": _torchvision("resnet18"),
    "tv_resnet50": _torchvision("resnet50"),
    "tv_mobilenet_v2": _torchvision("mobilenet_v2"),
}

# Which family an architecture belongs to decides its hook sets (see extract.hooks).
FAMILY = {
    "resnet18": "cifar_resnet", "resnet34": "cifar_resnet", "resnet50": "cifar_resnet",
    "resnet18_32x32": "cifar_resnet", "wrn_40_2": "wrn",
    "BiT-S-R50x1": "bit", "BiT-S-R101x1": "bit",
    "tv_resnet18": "torchvision", "tv_resnet50": "torchvision", "tv_mobilenet_v2": "torchvision",
}


def build_model(arch, num_classes):
    """Build ``arch`` with a ``num_classes``-way head, in eval mode; unknown names list the valid ones."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise ValueError(f"--num-classes must be at least 2, got {num_classes}")
    return ARCHITECTURES[arch](num_classes).eval()


def head_module(model):
    """The classifier head of ``model`` (``nn.Linear`` or 1x1 ``nn.Conv2d``), found by ``head_name``."""
    return model.get_submodule(model.head_name)


def head_weight_bias(model):
    """Head weight as a (K, D) tensor and bias as (K,), detached, on the model's device."""
    head = head_module(model)
    weight = head.weight.detach().reshape(head.weight.shape[0], -1)
    return weight, head.bias.detach()


def is_norm(module):
    return isinstance(module, (nn.BatchNorm2d, nn.GroupNorm))
