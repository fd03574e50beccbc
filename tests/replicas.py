"""Replicas of the block types of real torchvision and timm networks (neither is a dependency).

Each class copies what its original computes and how its code is written where that
matters to the passes (a ``forward`` override, an ``__init__`` with keyword-only arguments,
a call fx cannot trace). Every builder returns ``(model, example_input)`` in eval mode with
randomised BN statistics, as ``tests/zoo.py`` does.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo import randomise_bn


# ----------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: BN2d whose forward also applies drop and act."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class Linear(nn.Linear):
    """timm.layers.linear.Linear: the same computation as nn.Linear, in an overridden forward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            bias = self.bias.to(dtype=input.dtype) if self.bias is not None else None
            return F.linear(input, self.weight.to(dtype=input.dtype), bias=bias)
        return F.linear(input, self.weight, self.bias)


def _same_pad(x: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(x / s) - 1) * s + (k - 1) * d + 1 - x, 0)


def pad_same(x, kernel_size, stride, dilation):
    ih, iw = x.size()[-2:]
    pad_h = _same_pad(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = _same_pad(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


class Conv2dSame(nn.Conv2d):
    """timm.layers.conv2d_same.Conv2dSame: TensorFlow-style 'SAME' padding, computed from the input size."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# ----------------------------------------------------------------------------------------
# the efficientnet-lite-pytorch wheel (utils.py)
# ----------------------------------------------------------------------------------------
class Identity(nn.Module):
    def forward(self, input):
        return input


class Conv2dStaticSamePadding(nn.Conv2d):
    """efficientnet_lite_pytorch.utils.Conv2dStaticSamePadding: TF 'SAME' pads fixed for ``image_size``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, image_size=None, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        self.stride = self.stride if len(self.stride) == 2 else [self.stride[0]] * 2
        ih, iw = (image_size, image_size) if isinstance(image_size, int) else image_size
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        else:
            self.static_padding = Identity()

    def forward(self, x):
        x = self.static_padding(x)
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return x


class Conv2dDynamicSamePadding(nn.Conv2d):
    """efficientnet_lite_pytorch.utils.Conv2dDynamicSamePadding: TF 'SAME' pads from each input's size."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        self.stride = self.stride if len(self.stride) == 2 else [self.stride[0]] * 2

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm.layers.std_conv.StdConv2d: the weight is standardised in forward, so BN must not fold into it."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class EfficientNetLiteish(nn.Module):
    """timm-style blocks: Conv2dSame stem + BatchNormAct2d, depthwise separable blocks, a timm Linear head."""

    def __init__(self):
        super().__init__()
        self.conv_stem = Conv2dSame(3, 8, 3, stride=2, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.blocks = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), BatchNormAct2d(8, act_layer=nn.ReLU6),
            nn.Conv2d(8, 16, 1, bias=False), BatchNormAct2d(16, apply_act=False),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), BatchNormAct2d(16, drop_layer=nn.Dropout),
        )
        self.classifier = Linear(16, 5)

    def forward(self, x):
        x = self.blocks(self.bn1(self.conv_stem(x)))
        return self.classifier(x.mean((2, 3)))


class EfficientNetWheelish(nn.Module):
    """The efficientnet-lite-pytorch wheel's layers: a static-'same' stem and depthwise convs, a dynamic-'same'
    strided depthwise conv, 1x1 convs whose static pad is an Identity, BN + ReLU6 after each."""

    def __init__(self, image_size=17):
        super().__init__()
        def bn(c):
            return nn.BatchNorm2d(c, momentum=0.01, eps=1e-3)
        self._conv_stem = Conv2dStaticSamePadding(3, 8, 3, stride=2, bias=False, image_size=image_size)
        self._bn0 = bn(8)
        self._depthwise_conv = Conv2dStaticSamePadding(8, 8, 3, groups=8, bias=False, image_size=9)
        self._bn1 = bn(8)
        self._project_conv = Conv2dStaticSamePadding(8, 16, 1, bias=False, image_size=9)
        self._bn2 = bn(16)
        self._dynamic_conv = Conv2dDynamicSamePadding(16, 16, 5, stride=2, groups=16, bias=False)
        self._bn3 = bn(16)
        self._fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        x = F.relu6(self._bn3(self._dynamic_conv(x)))
        return self._fc(x.mean((2, 3)))


class UntraceableBNAct(nn.Module):
    """An nn.Sequential that fx cannot trace (a data-dependent branch), with BN-act subclasses in it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8),
                                      nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.SiLU))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: the whole model does not trace
            x = x * 1.0
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: BN with fixed statistics held as buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class Conv3DSimple(nn.Conv3d):
    """torchvision.models.video.resnet.Conv3DSimple: nn.Conv3d with its own __init__ only."""

    def __init__(self, in_planes, out_planes, midplanes=None, stride=1, padding=1):
        super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=padding, bias=False)


class Transform(nn.Module):
    """GeneralizedRCNNTransform-like: keyword-only __init__, list[Tensor] in, a batch out."""

    def __init__(self, *, min_size: int, image_mean: List[float], image_std: List[float], **kwargs):
        super().__init__()
        self.min_size = min_size
        self.register_buffer("mean", torch.tensor(image_mean).reshape(-1, 1, 1))
        self.register_buffer("std", torch.tensor(image_std).reshape(-1, 1, 1))

    def forward(self, images: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack([(img - self.mean) / self.std for img in images])


class Detectorish(nn.Module):
    """A detection-style model: keyword-only __init__, list of images in, a FrozenBN backbone with
    a Conv3DSimple-free 2-D path, an untraceable top level and a per-level head."""

    def __init__(self, *, num_classes: int, min_size: int = 32, image_mean=(0.5, 0.5, 0.5), image_std=(0.25,) * 3):
        super().__init__()
        self.transform = Transform(min_size=min_size, image_mean=list(image_mean), image_std=list(image_std))
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), FrozenBatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.ModuleDict({
            "cls": nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                 nn.Conv2d(16, num_classes, 1)),
            "box": nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 4, 1)),
        })

    def forward(self, images: List[torch.Tensor]):
        x = self.backbone(self.transform(images))
        out = {}
        for name, head in self.head.items():  # iterating a dict: fx cannot trace the top level
            out[name] = head(x)
        return torch.cat([out["cls"], out["box"]], dim=1)


# ----------------------------------------------------------------------------------------
# stereo and decoders (3-D and transposed convolutions)
# ----------------------------------------------------------------------------------------
class StereoNet(nn.Module):
    """A stereo cost-volume net: a shared (siamese) 2-D feature extractor, a concatenation cost
    volume over disparities, and a 3-D aggregation with Conv3d + BN3d and a ConvTranspose3d."""

    def __init__(self, max_disp: int = 4):
        super().__init__()
        self.max_disp = max_disp
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.agg = nn.Sequential(
            Conv3DSimple(16, 8), nn.BatchNorm3d(8), nn.ReLU(),
            nn.Conv3d(8, 8, 3, stride=(1, 2, 2), padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(),
            nn.ConvTranspose3d(8, 8, 3, stride=(1, 2, 2), padding=1, output_padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(8), nn.ReLU(),
            nn.Conv3d(8, 1, 3, padding=1),
        )

    def forward(self, left, right):
        fl, fr = self.features(left), self.features(right)
        cost = [torch.cat([fl, torch.roll(fr, d, dims=3)], dim=1) for d in range(self.max_disp)]
        volume = torch.stack(cost, dim=2)  # (N, 2C, D, H, W)
        return self.agg(volume).squeeze(1)


class Decoder(nn.Module):
    """A segmentation decoder: grouped, dilated, output-padded ConvTranspose2d, a ConvTranspose1d
    branch and a ConvTranspose3d, each followed by its BN."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, groups=4, dilation=1, bias=False)
        self.bn_up = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=2, output_padding=1, groups=2, dilation=2)
        self.bn_up2 = nn.BatchNorm2d(8)
        self.line = nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)
        self.bn_line = nn.BatchNorm1d(4)
        self.vol = nn.ConvTranspose3d(1, 2, (2, 3, 3), stride=(2, 1, 1), padding=(0, 1, 1))
        self.bn_vol = nn.BatchNorm3d(2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.bn_up(self.up(self.enc(x))))
        y = F.relu(self.bn_up2(self.up2(y)))
        line = F.relu(self.bn_line(self.line(y.mean(2))))  # (N, 4, 2W)
        vol = F.relu(self.bn_vol(self.vol(y.mean(1, keepdim=True).unsqueeze(2))))  # (N, 2, 2, H, W)
        return self.out(y).sum((1, 2)) + line.sum(1)[:, ::2] + vol.sum((1, 2, 3))[:, None]


class VideoNet(nn.Module):
    """r3d_18-like: a Conv3DSimple stem with BN3d (fx traces into the subclass by default)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(Conv3DSimple(3, 8, stride=(1, 2, 2)), nn.BatchNorm3d(8), nn.ReLU(inplace=True))
        self.layer = nn.Sequential(Conv3DSimple(8, 8), nn.BatchNorm3d(8), nn.ReLU(inplace=True))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.layer(self.stem(x)).mean((2, 3, 4)))


def randomise_frozen(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def build(name: str, seed: int = 0):
    """``(model, example_inputs)``: the inputs are a tuple of positional arguments."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    if name == "efficientnet_liteish":
        m, x = EfficientNetLiteish(), (torch.randn(2, 3, 17, 17, generator=g),)
    elif name == "efficientnet_wheelish":
        m, x = EfficientNetWheelish(), (torch.randn(2, 3, 17, 17, generator=g),)
    elif name == "untraceable_bnact":
        m, x = UntraceableBNAct(), (torch.randn(2, 3, 8, 8, generator=g),)
    elif name == "detectorish":
        m, x = Detectorish(num_classes=3), ([torch.rand(3, 16, 16, generator=g) for _ in range(2)],)
    elif name == "stereo":
        m, x = StereoNet(), (torch.randn(1, 3, 8, 12, generator=g), torch.randn(1, 3, 8, 12, generator=g))
    elif name == "decoder":
        m, x = Decoder(), (torch.randn(2, 3, 8, 8, generator=g),)
    elif name == "video":
        m, x = VideoNet(), (torch.randn(1, 3, 4, 8, 8, generator=g),)
    else:
        raise KeyError(name)
    return randomise_frozen(randomise_bn(m, seed)).eval(), x


NAMES = ("efficientnet_liteish", "efficientnet_wheelish", "untraceable_bnact", "detectorish", "stereo", "decoder", "video")
