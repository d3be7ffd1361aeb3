"""CIFAR ResNet-18/34/50 with the state-dict layout of GAIA's release (``networks/resnet.py``).

3x3 stem without max-pool, ``layer1..4``, a functional 4x4 average pool and a ``linear``
head. ``forward`` returns logits of shape (N, K); the pooled
penultimate vector (N, D) is the input of the head.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes, out_planes, stride):
    """Identity (an empty Sequential, as in the release) or a 1x1 conv + BN projection."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs; head attribute ``linear``."""

    head_name = "linear"

    def __init__(self, block, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Kernel 4 as in the release: at 32x32 input the 4x4 map becomes 1x1.
        out = F.avg_pool2d(out, 4).flatten(1)
        return self.linear(out)


def resnet18(num_classes):
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes):
    return CifarResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes):
    return CifarResNet(Bottleneck, [3, 4, 6, 3], num_classes)


class ResNet18_32x32(CifarResNet):
    """OpenOOD's ``resnet18_32x32``: same blocks, an ``avgpool`` module and an ``fc`` head.

    The global pool is a module (``nn.AdaptiveAvgPool2d(1)``), so it can be hooked by
    name; NAC-UE's ``avgpool`` layer refers to its output, the mean-pooled vector.
    """

    head_name = "fc"

    def __init__(self, num_classes=10):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes)
        del self.linear
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(out).flatten(1)
        return self.fc(out)
