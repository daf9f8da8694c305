"""The PyTorch models every flaxres architecture must equal.

torchvision's own classes where torchvision has the net (ResNet-18..152, ResNeXt-50/101); its
ResNet with kuangliu/pytorch-cifar's 3x3 stride-1 stem for ``resnet*_cifar``; and for the CIFAR
family (He et al.'s resnet20..1202, plain nets, the bottleneck resnet164, ResNeXt-29) a compact
implementation in akamaster/pytorch_resnet_cifar10's style; the pre-activation nets (kuangliu's
PreActResNet18, He et al. 2016b's CIFAR nets) and the Wide ResNets as kuangliu's and the WRN
ports' blocks compute them. State-dict keys follow torchvision
(``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``), which is what flaxres' module tree
implies.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from flaxres.registry import cifar_blocks_per_stage

_TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
                "wide_resnet101_2")


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, norm: bool = True):
    # Without BatchNorm a conv needs its bias (the no-BN degradation study).
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=not norm)


def _bn(c: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if norm else nn.Identity()


class PadShortcut(nn.Module):
    """Option A (akamaster's LambdaLayer): subsample, then zero-pad channels on both sides."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.lo, self.hi = stride, (cout - cin) // 2, cout - cin - (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.lo, self.hi))


class _Block(nn.Module):
    def _init_shortcut(self, shortcut, cin: int, cout: int, stride: int, norm: bool) -> None:
        self.has_shortcut = shortcut is not None
        self.shortcut: nn.Module = nn.Identity()
        self.downsample: nn.Module | None = None
        reshapes = stride != 1 or cin != cout
        if shortcut == "A" and reshapes:
            self.shortcut = PadShortcut(cin, cout, stride)
        elif shortcut == "C" or (shortcut == "B" and reshapes):
            layers = [_conv(cin, cout, 1, stride, norm=norm)] + ([nn.BatchNorm2d(cout)] if norm else [])
            self.downsample = nn.Sequential(*layers)

    def _add_shortcut(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.has_shortcut:
            return F.relu(out)
        identity = self.downsample(x) if self.downsample is not None else self.shortcut(x)
        return F.relu(out + identity)


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, cin, planes, stride=1, shortcut="A", norm=True, groups=1, base_width=64):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride, norm=norm)
        self.bn1 = _bn(planes, norm)
        self.conv2 = _conv(planes, planes, 3, norm=norm)
        self.bn2 = _bn(planes, norm)
        self._init_shortcut(shortcut, cin, planes, stride, norm)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self._add_shortcut(self.bn2(self.conv2(out)), x)


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, cin, planes, stride=1, shortcut="B", norm=True, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv(cin, width, 1, norm=norm)
        self.bn1 = _bn(width, norm)
        self.conv2 = _conv(width, width, 3, stride, groups, norm=norm)
        self.bn2 = _bn(width, norm)
        self.conv3 = _conv(width, planes * 4, 1, norm=norm)
        self.bn3 = _bn(planes * 4, norm)
        self._init_shortcut(shortcut, cin, planes * 4, stride, norm)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self._add_shortcut(self.bn3(self.conv3(out)), x)


class PreActBlock(nn.Module):
    """kuangliu's ``PreActBlock`` (and the Wide ResNets' block, with dropout between the convs):
    BN-ReLU before each conv; a projection shortcut takes the pre-activated input."""

    expansion = 1

    def __init__(self, cin, planes, stride=1, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """kuangliu's ``PreActBottleneck``: BN-ReLU before each of the three convs, stride on the
    3x3."""

    expansion = 4

    def __init__(self, cin, planes, stride=1, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return self.conv3(F.relu(self.bn3(out))) + shortcut


class PreActResNet(nn.Module):
    """Pre-activation nets: a bare 3x3 stem conv, stages of pre-activation blocks, then (He et
    al. 2016b, the Wide ResNets) a final BN-ReLU, or (kuangliu's PreActResNet18) none."""

    def __init__(self, block, layers, widths, stem_width, num_classes=10, head_norm=True,
                 dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
        self.maxpool = nn.Identity()  # torchvision's attribute layout, so hooks work alike
        cin = stem_width
        for i, (n, planes) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1, dropout))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.bn = nn.BatchNorm2d(cin) if head_norm else None
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = F.relu(self.bn(x)) if self.bn is not None else x
        return self.fc(x.mean((2, 3)))


class CifarResNet(nn.Module):
    """3x3 stride-1 stem, no max-pool, stages of blocks (first stride 1, then 2), pool, fc."""

    def __init__(self, block, layers, widths, stem_width, num_classes=10, shortcut="A", norm=True,
                 groups=1, width_per_group=64):
        super().__init__()
        self.conv1 = _conv(3, stem_width, 3, norm=norm)
        self.bn1 = _bn(stem_width, norm)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # torchvision's attribute layout, so hooks work alike
        cin = stem_width
        for i, (n, planes) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(cin, planes, stride, shortcut, norm, groups, width_per_group))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init(model: nn.Module) -> None:
    """torchvision's scheme: Kaiming-normal fan-out convs, BN 1/0; Linear and conv biases default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


_UNSET = object()


def _preact_model(family: str, depth: int, widen: int, num_classes: int,
                  dropout: float) -> PreActResNet:
    if family == "wrn":
        n = (depth - 4) // 6
        return PreActResNet(PreActBlock, (n, n, n), (16 * widen, 32 * widen, 64 * widen), 16,
                            num_classes, dropout=dropout)
    if depth == 18:  # kuangliu's PreActResNet18: ImageNet widths, no final BN
        return PreActResNet(PreActBlock, (2, 2, 2, 2), (64, 128, 256, 512), 64, num_classes,
                            head_norm=False)
    bottleneck = depth == 164
    n = cifar_blocks_per_stage(depth, bottleneck)
    return PreActResNet(PreActBottleneck if bottleneck else PreActBlock, (n, n, n), (16, 32, 64),
                        16, num_classes)


def create_torch_model(name: str, num_classes: int = 10, *, shortcut=_UNSET,
                       norm: bool = True, dropout: float = 0.0) -> nn.Module:
    """The PyTorch reference for a ``flaxres.list_models()`` name.

    ``shortcut`` ("A", "B", "C", None) and ``norm`` mirror the flaxres overrides of the same name
    and exist for the CIFAR family (torchvision's nets have fixed option B with BatchNorm);
    ``dropout`` is the Wide ResNets'.
    """
    if name in _TORCHVISION or re.fullmatch(r"resnet\d+_cifar", name):
        if shortcut is not _UNSET or not norm:
            raise ValueError(f"{name}: torchvision's layout has no shortcut/norm overrides")
        model = getattr(torchvision.models, name.removesuffix("_cifar"))(num_classes=num_classes)
        if name.endswith("_cifar"):  # kuangliu/pytorch-cifar's stem
            model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
            model.maxpool = nn.Identity()
        return model
    if m := re.fullmatch(r"(preact_resnet|wrn)(\d+)(?:_(\d+))?", name):
        if shortcut is not _UNSET or not norm:
            raise ValueError(f"{name}: pre-activation nets have no shortcut/norm overrides")
        return _preact_model(m[1], int(m[2]), int(m[3] or 1), num_classes, dropout)
    kw = {"num_classes": num_classes, "norm": norm}
    if m := re.fullmatch(r"resnext29_(\d+)x(\d+)d", name):
        return CifarResNet(Bottleneck, (3, 3, 3), (64, 128, 256), 64, groups=int(m[1]),
                           width_per_group=int(m[2]),
                           shortcut="B" if shortcut is _UNSET else shortcut, **kw)
    if m := re.fullmatch(r"(resnet|plain)(\d+)", name):
        depth = int(m[2])
        bottleneck = m[1] == "resnet" and depth == 164
        n = cifar_blocks_per_stage(depth, bottleneck)
        default = None if m[1] == "plain" else ("B" if bottleneck else "A")
        return CifarResNet(Bottleneck if bottleneck else BasicBlock, (n, n, n), (16, 32, 64), 16,
                           shortcut=default if shortcut is _UNSET else shortcut, **kw)
    raise ValueError(f"no PyTorch reference for {name!r}")
