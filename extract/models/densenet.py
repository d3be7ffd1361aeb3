"""DenseNet-BC-100 for CIFAR (growth 12, compression 0.5, bottleneck layers), with the
state-dict layout of the ``DenseNet3`` class the ODIN, Mahalanobis, Energy, ReAct and DICE
releases share: ``conv1``, ``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2}``,
``trans{1,2}.{bn1,conv1}``, final ``bn1`` + in-place ``relu``, a functional 8x8 average
pool, head ``fc`` (342 features).

Each bottleneck layer reuses one in-place ReLU module twice (as the releases do), so those
ReLUs cannot be hooked; their BatchNorms and the blocks can.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BottleneckBlock(nn.Module):
    def __init__(self, in_planes, out_planes, drop_rate=0.0):
        super().__init__()
        inter = out_planes * 4
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, inter, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(self.relu(self.bn2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return torch.cat([x, out], 1)


class TransitionBlock(nn.Module):
    def __init__(self, in_planes, out_planes, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return F.avg_pool2d(out, 2)


class DenseBlock(nn.Module):
    def __init__(self, n, in_planes, growth_rate, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[BottleneckBlock(in_planes + i * growth_rate, growth_rate, drop_rate)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class DenseNet3(nn.Module):
    """DenseNet-BC of ``depth`` (3 dense blocks); head attribute ``fc``."""

    head_name = "fc"

    def __init__(self, depth, num_classes, growth_rate=12, reduction=0.5, drop_rate=0.0):
        super().__init__()
        planes = 2 * growth_rate
        n = (depth - 4) // 6          # bottleneck layers per block
        self.conv1 = nn.Conv2d(3, planes, 3, 1, 1, bias=False)
        self.block1 = DenseBlock(n, planes, growth_rate, drop_rate)
        planes += n * growth_rate
        self.trans1 = TransitionBlock(planes, int(math.floor(planes * reduction)), drop_rate)
        planes = int(math.floor(planes * reduction))
        self.block2 = DenseBlock(n, planes, growth_rate, drop_rate)
        planes += n * growth_rate
        self.trans2 = TransitionBlock(planes, int(math.floor(planes * reduction)), drop_rate)
        planes = int(math.floor(planes * reduction))
        self.block3 = DenseBlock(n, planes, growth_rate, drop_rate)
        planes += n * growth_rate
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(planes, num_classes)
        self.in_planes = planes

    def forward(self, x):
        out = self.trans1(self.block1(self.conv1(x)))
        out = self.trans2(self.block2(out))
        out = self.relu(self.bn1(self.block3(out)))
        # the releases' fixed 8x8 pool: at 32x32 input the 8x8 map becomes 1x1
        out = F.avg_pool2d(out, 8).view(-1, self.in_planes)
        return self.fc(out)


def densenet_bc_100(num_classes):
    return DenseNet3(100, num_classes)
