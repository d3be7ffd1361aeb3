"""The CIFAR ResNet-20 of gradient tracking's release (``gengandrew/Open_OOD``,
``models/resnet.py`` ``ResNet20``), state-dict layout included.

3x3 stem (16 channels, ``conv1`` + ``bn1``), ``layer1..3`` of three basic blocks (16, 32,
64 channels), parameter-free "option A" shortcuts (every second pixel, zero-padded
channels), functional ReLUs, a global average pool and the head ``linear`` (64 features).
The release's inputs are ``ToTensor()`` alone (``--preprocess totensor``). Its
lottery-ticket checkpoints wrap this model (``model.`` prefixes, ``mask_*`` buffers):
``extract.checkpoint`` reads them.
"""
import torch.nn as nn
import torch.nn.functional as F

from . import cifar_resnet


class Shortcut(nn.Module):
    """Option A: ``x[:, :, ::2, ::2]`` with ``pad`` zero channels on each side."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlock(cifar_resnet.BasicBlock):
    """GAIA's basic block with the parameter-free option-A shortcut."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__(in_planes, planes, stride)
        self.shortcut = Shortcut(planes // 4) if stride != 1 or in_planes != planes else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)      # in place, as the release
        return F.relu(out)


class ResNet20(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with ``num_blocks`` per stage; head ``linear``."""

    head_name = "linear"

    def __init__(self, num_blocks=(3, 3, 3), num_classes=10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3]).view(out.size(0), -1)
        return self.linear(out)


def resnet20(num_classes):
    return ResNet20((3, 3, 3), num_classes)
