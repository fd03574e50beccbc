"""A model zoo for the conversion tests: small, seeded, with randomised BN statistics.

Every builder returns ``(model, example_input)`` with the model in eval mode and its BN
running statistics and affine parameters randomised, so that folding has real work to do.
``FOLDABLE`` / ``UNFOLDABLE`` list, per model, the BN names that must / must not fold.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetish(nn.Module):
    """Stem, two residual stages (one with a downsample branch), pooling, a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MobileNetish(nn.Module):
    """Depthwise-separable, grouped and dilated convolutions, each followed by BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.grouped_bn = nn.BatchNorm2d(32)
        self.dilated = nn.Conv2d(32, 16, 3, padding=2, dilation=2)
        self.dilated_bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = F.relu6(self.bn(self.conv(x)))
        x = F.relu6(self.dw_bn(self.dw(x)))
        x = F.relu6(self.pw_bn(self.pw(x)))
        x = F.relu(self.grouped_bn(self.grouped(x)))
        x = F.relu(self.dilated_bn(self.dilated(x)))
        return self.head(x)


class UNetish(nn.Module):
    """Encoder-decoder with a grouped ConvTranspose2d + BN and a skip concatenation."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, groups=2)
        self.up_bn = nn.BatchNorm2d(8)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.out = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        u = F.relu(self.up_bn(self.up(e2)))
        return self.out(self.dec(torch.cat([u, e1], dim=1)))


class Seq1d(nn.Module):
    """Conv1d + BN1d on sequences, then Linear + BN1d on features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 12, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm1d(12)
        self.conv2 = nn.Conv1d(12, 12, 3, padding=1, groups=3)
        self.bn2 = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 20)
        self.fc_bn = nn.BatchNorm1d(20)
        self.out = nn.Linear(20, 3)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn(self.conv(x))))))
        x = x.mean(-1)
        return self.out(F.relu(self.fc_bn(self.fc(x))))


class Awkward(nn.Module):
    """What must not fold: a reused conv, BN before a conv, BN without running stats,
    a producer with two users, and a BN in training mode inside an eval model."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.shared_bn = nn.BatchNorm2d(8)  # producer called twice
        self.pre_bn = nn.BatchNorm2d(3)  # BN before the conv
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.nostats = nn.BatchNorm2d(8, track_running_stats=False)
        self.branch = nn.Conv2d(8, 8, 1)
        self.branch_bn = nn.BatchNorm2d(8)  # the producer's output has another user
        self.ok = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.ok_bn = nn.BatchNorm2d(8, affine=False)  # foldable: affine=False, conv without bias

    def forward(self, x):
        x = self.conv_in(self.pre_bn(x))
        x = self.nostats(x)
        y = self.shared_bn(self.shared(x))
        y = self.shared(y)
        b = self.branch(y)
        y = self.branch_bn(b) + b
        return self.ok_bn(self.ok(y))


class Dynamic(nn.Module):
    """Data-dependent control flow at the top: torch.fx cannot trace it; the Sequential inside folds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent: breaks symbolic tracing
            y = y * 2
        return self.head(y.mean((2, 3)))


class ConvTranspose3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 6, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm3d(6)
        self.t3 = nn.ConvTranspose3d(6, 4, 2, stride=2, groups=2)
        self.tb3 = nn.BatchNorm3d(4)
        self.t1 = nn.ConvTranspose1d(4, 6, 3, groups=2, bias=False)
        self.tb1 = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.tb3(self.t3(F.relu(self.b3(self.c3(x)))))
        x = x.mean((3, 4))
        return self.tb1(self.t1(x))


def _make(cls, shape, seed):
    torch.manual_seed(seed)
    model = randomise_bn(cls(), seed)
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 100))


ZOO = {
    "resnet": lambda: _make(ResNetish, (4, 3, 16, 16), 1),
    "mobilenet": lambda: _make(MobileNetish, (4, 3, 16, 16), 2),
    "unet": lambda: _make(UNetish, (2, 3, 16, 16), 3),
    "seq1d": lambda: _make(Seq1d, (4, 4, 24), 4),
    "awkward": lambda: _make(Awkward, (2, 3, 12, 12), 5),
    "dynamic": lambda: _make(Dynamic, (2, 3, 12, 12), 6),
    "transpose3d": lambda: _make(ConvTranspose3dNet, (2, 2, 4, 4, 4), 7),
}

FOLDABLE = {
    "resnet": ["stem.1", "layer1.bn1", "layer1.bn2", "layer2.bn1", "layer2.bn2", "layer2.downsample.1"],
    "mobilenet": ["bn", "dw_bn", "pw_bn", "grouped_bn", "dilated_bn"],
    "unet": ["enc1.1", "enc2.1", "up_bn", "dec.1"],
    "seq1d": ["bn", "bn2", "fc_bn"],
    "awkward": ["ok_bn"],
    "dynamic": ["body.1", "body.4"],
    "transpose3d": ["b3", "tb3", "tb1"],
}

UNFOLDABLE = {  # BN name -> a word the report's reason must contain
    "awkward": {"shared_bn": "places", "pre_bn": "before", "nostats": "running stats", "branch_bn": "other users"},
}


def calibration_batches(x: torch.Tensor, n: int = 4, seed: int = 0):
    """``n`` batches shaped like ``x`` (seeded), for calibration."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g) for _ in range(n)]


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


# ----------------------------------------------------------------------------------------
# a small trained network (recovery and mixed-precision tests)
# ----------------------------------------------------------------------------------------
class MBBlock(nn.Module):
    def __init__(self, c, expand=2):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class TinyMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(MBBlock(16), MBBlock(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@functools.lru_cache(maxsize=1)
def trained_digits_net():
    """A real-weight-like net: TinyMobileNet trained briefly on scikit-learn's digits; (model, calibration
    batches, held-out digits), calibration apart from evaluation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = TinyMobileNet()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(2):
        for idx in torch.randperm(1200, generator=torch.Generator().manual_seed(1)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    calib, held = x[1200:1440], x[1440:]  # calibration apart from evaluation
    return model, list(calib.split(48)), held
