"""EfficientNet-Lite's architecture as numbers: its variants and the blocks of each stage.

Plain Python, no torch: the registry reads a variant's tap points (stage ends and channels) from here
without building, or even importing, the network (`pipeline.models.efficientnet_lite`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# (repeats, kernel, stride, expand ratio, input filters, output filters) of the seven stages.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int


VARIANTS = {
    "efficientnet-lite0": LiteVariant(1.0, 1.0, 224),
    "efficientnet-lite1": LiteVariant(1.0, 1.1, 240),
    "efficientnet-lite2": LiteVariant(1.1, 1.2, 260),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF's rounding: scale, snap to a multiple of 8, never shrink by more than 10%."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stage_plan(variant: str) -> list[tuple[int, int, int, int, int, int]]:
    """(repeats, kernel, stride, expand, input channels, output channels) of each stage of `variant`."""
    spec = VARIANTS[variant]
    plan = []
    last = len(_STAGES) - 1
    for i, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(_STAGES):
        in_ch = 32 if i == 0 else _round_filters(in_f, spec.width)
        if 0 < i < last:  # the first and last stages keep their depth in the Lite variants
            repeats = math.ceil(repeats * spec.depth)
        plan.append((repeats, kernel, stride, expand, in_ch, _round_filters(out_f, spec.width)))
    return plan


def stage_layout(variant: str) -> tuple[list[int], list[int]]:
    """(index of the last block of each stage, output channels of each stage), without building anything."""
    ends, channels, count = [], [], 0
    for repeats, *_, out_ch in stage_plan(variant):
        count += repeats
        ends.append(count - 1)
        channels.append(out_ch)
    return ends, channels
