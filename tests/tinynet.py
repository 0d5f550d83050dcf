"""Tiny registered backbones for fast tests: the same code paths as a real one, a fraction of the cost.

Two small CNNs (stem, three conv blocks, 1x1 head convolution, each with its BatchNorm; module
names shaped like EfficientNet-Lite's so that fine-tuning finds `conv` and `_bn` parameters) on
32 px crops. Their fixed-seed weights are a real state dict that `write_weights` saves to a file;
`load_backbone` reads it with `weights_only=True` and its SHA-256 goes into the cache key, as for any
backbone. They are registered through the public API by the plugin function `register_tiny`:

    PIPELINE_PLUGINS=tests.tinynet:register_tiny PIPELINE_TINY_WEIGHTS=<folder of write_weights>

which tests/conftest.py sets for the whole session, so `python -m pipeline.cli` subprocesses and
Dask workers started by a test know them too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pipeline.core.errors import BackboneError
from pipeline.images.preprocess import Preprocess
from pipeline.models.registry import BackboneSpec, Layer, register

PLUGIN = "tests.tinynet:register_tiny"
WEIGHTS_ENV = "PIPELINE_TINY_WEIGHTS"  # the folder holding <name>.pth for each tiny backbone
NAME = "tiny_test"
WIDE = "tiny_test_wide"  # a second backbone, with a 2048-wide head: ranking, and features past 1 MB
# name -> (stem width, head width, weights seed)
VARIANTS = {NAME: (8, 64, 0), WIDE: (12, 2048, 1)}
PREPROCESS = Preprocess(40, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")


class TinyBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self._conv = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self._bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self._bn(self._conv(x)))


class TinyNet(nn.Module):
    def __init__(self, width: int, head: int, classes: int = 10) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(width)
        self._blocks = nn.ModuleList([TinyBlock(width, 2 * width, 2), TinyBlock(2 * width, 2 * width, 1),
                                      TinyBlock(2 * width, 4 * width, 2)])
        self._conv_head = nn.Conv2d(4 * width, head, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head)
        self._head_act = nn.ReLU()  # a module, so the head output can be tapped
        self._fc = nn.Linear(head, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._fc(self._head_act(self._bn1(self._conv_head(x))).mean((2, 3)))


def layers(name: str) -> dict[str, Layer]:
    width, head, _seed = VARIANTS[name]
    return {"stage1": Layer("_blocks.0", 2 * width), "stage2": Layer("_blocks.2", 4 * width),
            "head": Layer("_head_act", head)}


def write_weights(folder: Path) -> dict[str, Path]:
    """Save each tiny backbone's fixed-seed state dict as `folder/<name>.pth`. Convolutions get He
    initialisation and every BatchNorm the statistics of a calibration pass over random inputs, so
    features have a real network's scale (not the vanishing one of PyTorch's default init). The global
    RNG is left as it was."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (width, head, seed) in VARIANTS.items():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            network = TinyNet(width, head)
            for module in network.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    module.momentum = None  # a cumulative average over the calibration batches
            network.train()
            with torch.no_grad():
                for _ in range(4):
                    network(torch.rand(16, 3, PREPROCESS.crop, PREPROCESS.crop) * 4 - 2)
        paths[name] = folder / f"{name}.pth"
        torch.save(network.state_dict(), paths[name])
    return paths


def _spec(name: str) -> BackboneSpec:
    width, head, _seed = VARIANTS[name]

    def locate() -> Path:
        folder = os.environ.get(WEIGHTS_ENV)
        if not folder:
            raise BackboneError(f"the weights of {name!r} are written by tests/tinynet.py write_weights: "
                                f"set {WEIGHTS_ENV} to their folder")
        return Path(folder) / f"{name}.pth"

    return BackboneSpec(name=name, build=lambda: TinyNet(width, head), locate_weights=locate,
                        preprocess=PREPROCESS, layers=layers(name), default_layer="head",
                        source="tests/tinynet.py: fixed-seed random weights, for tests only")


def register_tiny() -> None:
    """The plugin function: register every tiny backbone (nothing is built until it is asked for)."""
    for name in VARIANTS:
        register(name, lambda name=name: _spec(name))
