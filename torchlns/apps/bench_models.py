"""The networks that ``python -m torchlns bench`` and ``bench/`` time, written out here.

torchvision is not a dependency (its wheels do not import beside every torch), so these are
small replicas of the layouts that matter for speed: a ResNet-18 (basic blocks), a
ResNet-50 (bottlenecks, 1x1 convs), a MobileNetV2 (depthwise and grouped convs), a VGG-11
(large 3x3 convs and a wide classifier) and the demo's SegNet. Widths and depths follow the
originals; only the classifier is sized for 128x128 inputs and 10 classes. They live in the
package, not in ``bench/``, so that ``python -m torchlns bench`` runs from any install.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn as nn

__all__ = ["NETWORKS", "build", "prepare"]


def _conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers: List[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, act=False)
        self.down = _conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.conv2(self.conv1(x)) + self.down(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        mid = cout // 4
        self.conv1 = _conv_bn(cin, mid, 1)
        self.conv2 = _conv_bn(mid, mid, 3, stride)
        self.conv3 = _conv_bn(mid, cout, 1, act=False)
        self.down = _conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.conv3(self.conv2(self.conv1(x))) + self.down(x))


class ResNet(nn.Module):
    def __init__(self, block, depths, widths, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for i, (depth, width) in enumerate(zip(depths, widths)):
            for j in range(depth):
                stages.append(block(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        layers = [_conv_bn(cin, mid, 1)] if expand != 1 else []
        layers += [_conv_bn(mid, mid, 3, stride, groups=mid), _conv_bn(mid, cout, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, num_classes=10):
        super().__init__()
        layers, cin = [_conv_bn(3, 32, 3, 2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class VGG11(nn.Module):
    CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]

    def __init__(self, num_classes=10, side=4):
        super().__init__()
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        # As torchvision's VGG (7x7 there): a fixed-size pool, so the classifier fits any input.
        layers.append(nn.AdaptiveAvgPool2d((side, side)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512 * side * side, 4096), nn.ReLU(inplace=True),
                                        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def _segnet():
    from .demo import SegNet

    return SegNet()


NETWORKS: Dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3], [256, 512, 1024, 2048]),
    "mobilenetv2": MobileNetV2,
    "vgg11": VGG11,
    "segnet": _segnet,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A network of ``NETWORKS`` with seeded weights and settled batch-norm statistics, in eval mode."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose from {sorted(NETWORKS)}")
    torch.manual_seed(seed)
    return prepare(NETWORKS[name](), seed)


@torch.no_grad()
def prepare(model: nn.Module, seed: int = 0, image: int = 64) -> nn.Module:
    """Give random weights realistic BN statistics: a few training-mode passes over random images.

    Without them every BN divides by var=1 and the activations grow layer by layer, which no
    trained network does; the quantizers would then see unrealistic ranges.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the passes below
    model.train()
    for _ in range(3):
        model(torch.rand(4, 3, image, image, generator=g))
    return model.eval()
