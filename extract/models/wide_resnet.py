"""WRN-40-2 with the state-dict layout of GAIA's release (``networks/wresnet.py``).

Pre-activation blocks with in-place ReLUs, ``block1..3`` (each ``.layer``), final ``bn1``
+ in-place ReLU, an ``AdaptAvgPool`` module and an ``fc`` head.
"""
import torch
import torch.nn as nn


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(0.0)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(
            in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        # Same data flow as the release: the pre-activation replaces x when the block
        # projects, and feeds the residual branch only otherwise.
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
            branch_in, residual = out, x
        else:
            x = self.relu1(self.bn1(x))
            branch_in, residual = x, None
        out = self.relu2(self.bn2(self.conv1(branch_in)))
        out = self.conv2(self.dropout(out))
        if residual is None:
            residual = self.convShortcut(x)
        return torch.add(residual, out)


class NetworkBlock(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide ResNet (depth = 6n + 4); head attribute ``fc``."""

    head_name = "fc"

    def __init__(self, depth, num_classes, widen_factor=1):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.nChannels = ch[3]
        self.AdaptAvgPool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.AdaptAvgPool(self.relu(self.bn1(out)))
        out = out.view(-1, self.nChannels)
        return self.fc(out)


def wrn_40_2(num_classes):
    return WideResNet(40, num_classes, widen_factor=2)
