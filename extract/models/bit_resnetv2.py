"""BiT ResNetV2 (pre-activation bottlenecks, GroupNorm, weight standardisation).

State-dict layout of the GradNorm / GAIA releases (``resnetv2.py``): ``root.conv``,
``body.blockN.unitNN.{gn1,conv1,gn2,conv2,gn3,conv3,downsample}``,
``before_head.{gn,relu,avg}``, ``head.conv`` (a 1x1 conv used as the linear head).
``forward`` returns logits (N, K); the head's input is the pooled vector.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (biased variance, eps 1e-10)."""

    def forward(self, x):
        v, m = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (self.weight - m) / torch.sqrt(v + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PreActBottleneck(nn.Module):
    def __init__(self, cin, cout, cmid, stride=1, groups=32):
        super().__init__()
        self.gn1 = nn.GroupNorm(groups, cin)
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, cmid)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride, 1, bias=False)
        self.gn3 = nn.GroupNorm(groups, cmid)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = self.relu(self.gn1(x))
        residual = self.downsample(out) if hasattr(self, "downsample") else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + residual


class ResNetV2(nn.Module):
    """ResNetV2 with ``block_units`` units per stage and width factor ``wf``; head ``head.conv``.

    ``groups`` (GroupNorm groups, 32 in BiT) may be lowered only for tiny test models.
    """

    head_name = "head.conv"

    def __init__(self, block_units, wf, num_classes, groups=32, base=64):
        super().__init__()
        b = base * wf
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(3, b, 7, 2, 3, bias=False)),
            ("pad", nn.ConstantPad2d(1, 0)),
            ("pool", nn.MaxPool2d(3, 2, 0)),
        ]))
        stages, cin = [], b
        for i, (units, mult) in enumerate(zip(block_units, (1, 2, 4, 8))):
            cout, cmid = 4 * b * mult, b * mult
            unit_list = []
            for u in range(1, units + 1):
                stride = 2 if (u == 1 and i > 0) else 1
                unit_list.append((f"unit{u:02d}", PreActBottleneck(cin, cout, cmid, stride, groups)))
                cin = cout
            stages.append((f"block{i + 1}", nn.Sequential(OrderedDict(unit_list))))
        self.body = nn.Sequential(OrderedDict(stages))
        self.before_head = nn.Sequential(OrderedDict([
            ("gn", nn.GroupNorm(groups, cin)),
            ("relu", nn.ReLU(inplace=True)),
            ("avg", nn.AdaptiveAvgPool2d(1)),
        ]))
        self.head = nn.Sequential(OrderedDict([("conv", nn.Conv2d(cin, num_classes, 1, bias=True))]))

    def forward(self, x):
        feat = self.before_head(self.body(self.root(x)))
        return self.head(feat)[..., 0, 0]


BIT_UNITS = {"BiT-S-R50x1": ([3, 4, 6, 3], 1), "BiT-S-R101x1": ([3, 4, 23, 3], 1)}


def _npz_names(model):
    """``{state-dict key: Big Transfer .npz key}`` for ``model`` (``bit_pytorch/models.py``
    ``load_from``, with GradNorm's split of the head into ``before_head`` and ``head``)."""
    p = "resnet/"
    names = {"root.conv.weight": f"{p}root_block/standardized_conv2d/kernel",
             "before_head.gn.weight": f"{p}group_norm/gamma", "before_head.gn.bias": f"{p}group_norm/beta",
             "head.conv.weight": f"{p}head/conv2d/kernel", "head.conv.bias": f"{p}head/conv2d/bias"}
    for block, stage in model.body.named_children():
        for unit, module in stage.named_children():
            u = f"{p}{block}/{unit}/"
            for i, part in enumerate("abc", start=1):
                names[f"body.{block}.{unit}.conv{i}.weight"] = f"{u}{part}/standardized_conv2d/kernel"
                names[f"body.{block}.{unit}.gn{i}.weight"] = f"{u}{part}/group_norm/gamma"
                names[f"body.{block}.{unit}.gn{i}.bias"] = f"{u}{part}/group_norm/beta"
            if hasattr(module, "downsample"):
                names[f"body.{block}.{unit}.downsample.weight"] = f"{u}a/proj/standardized_conv2d/kernel"
    return names


def state_dict_from_npz(model, arrays):
    """A state dict for ``model`` from the arrays of a Big Transfer ``.npz`` (``{key:
    ndarray}``): 4-D kernels HWIO -> OIHW (``tf2th``: transpose 3, 2, 0, 1), 1-D arrays
    as they are. Keys the file lacks are left out (the strict load then names them)."""
    import numpy as np
    out = {}
    for key, name in _npz_names(model).items():
        if name in arrays:
            value = np.asarray(arrays[name])
            out[key] = torch.from_numpy(value.transpose(3, 2, 0, 1).copy() if value.ndim == 4 else value.copy())
    return out
