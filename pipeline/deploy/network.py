"""The backbones a saved head reads, as one network from uint8 images to the head's feature row.

A head reads one or more sources (`BACKBONE:LAYER`); its feature row is their pooled outputs side by side,
in the order of `bundle.sources`. `HeadNetwork` loads each backbone once (checked against the head's
cache keys by `feature_options`, so nothing runs with other weights or preprocessing than the head was
fitted on) and takes one uint8 NHWC batch per input geometry: backbones whose resize, crop and
interpolation agree share an input (the common case: one input, `images`).

- `features` is the serving path: the very code extraction runs, at the head's precision. With
  `runtime="auto"` (the server's) that is the runtime the head's features came from: OpenVINO's compiled
  network (`pipeline.features.openvino_runtime`, the same to the bit as extraction's) for a head fitted
  on OpenVINO features, falling back to torch, logged, where OpenVINO cannot run the backbone or the
  device is CUDA; else `pipeline.features.extract.forward` (bf16 autocast where the head was fitted on
  bf16 features). `runtimes` says which ran each backbone.
- `module` is the export path: the same networks and normalisation as a plain fp32 `nn.Module` from the
  uint8 batches to the feature row, for `torch.onnx.export`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.features.extract import f32_modules, forward, resolve_device
from pipeline.features.openvino_runtime import CompiledNetwork, NetworkId, compiled_network, runtime_for
from pipeline.heads.bundle import HeadBundle
from pipeline.heads.predict import feature_options
from pipeline.images.preprocess import Preprocess
from pipeline.models.registry import get_spec
from pipeline.models.taps import TappedNetwork, tapped
from pipeline.models.weights import load_backbone

LAYOUT = "NHWC uint8 RGB"  # what every input of the network takes


@dataclass(frozen=True)
class Geometry:
    """What a caller must do to a decoded image before the network: resize the shorter side to `resize`
    with `interpolation`, centre-crop `crop` x `crop` (pipeline.images.decode does exactly this)."""

    resize: int
    crop: int
    interpolation: str

    @classmethod
    def of(cls, pre: Preprocess) -> Geometry:
        return cls(pre.resize, pre.crop, pre.interpolation)

    def describe(self) -> dict:
        return {"resize_shorter_side": self.resize, "center_crop": self.crop, "interpolation": self.interpolation,
                "layout": LAYOUT, "shape": [None, self.crop, self.crop, 3]}


@dataclass
class _Backbone:
    name: str
    network: TappedNetwork
    preprocess: Preprocess
    input: str  # the name of the input it reads
    compiled: CompiledNetwork | None  # OpenVINO's network where it computes the features, else None (torch)


class HeadNetwork:
    """The loaded backbones of a head (see the module's docstring); `device` is extraction's (auto, cpu, cuda);
    `runtime` is "torch" (export: the torch modules) or "auto" (serving: the runtime of the head's features)."""

    def __init__(self, bundle: HeadBundle, model: str | os.PathLike, device: str = "cpu",
                 runtime: str = "torch") -> None:
        if runtime not in ("auto", "torch"):
            raise ConfigError(f"runtime must be auto or torch, not {runtime!r}")
        options = feature_options(bundle, model)  # refuses a head whose features this installation cannot make
        self.bundle = bundle
        self.precision: str = options["precision"]
        self.device = resolve_device(device)
        openvino = runtime == "auto" and options["runtime"] == "openvino" and self.device == "cpu"
        self.sources = [(s.backbone, s.layer) for s in bundle.sources]
        geometries = list(dict.fromkeys(Geometry.of(get_spec(name).preprocess) for name in options["backbones"]))
        self.inputs: dict[str, Geometry] = {self._input_name(g, len(geometries)): g for g in geometries}
        names = {g: name for name, g in self.inputs.items()}
        self.backbones: list[_Backbone] = []
        for name in options["backbones"]:
            sha = next(s.weights_sha256 for s in bundle.sources if s.backbone == name)
            loaded = load_backbone(name, options["weights"], sha)
            layers = list(dict.fromkeys(layer for backbone, layer in self.sources if backbone == name))
            network = tapped(loaded, layers).to(self.device, memory_format=torch.channels_last).eval()
            pre = loaded.spec.preprocess
            key = NetworkId(name, options["weights"], sha, tuple(layers), self.precision,
                            f32_modules(name, self.precision, options["runtime"], options["openvino_f32"]))
            compiled = compiled_network(key) if openvino and runtime_for(key) == "openvino" else None
            self.backbones.append(_Backbone(name, network, pre, names[Geometry.of(pre)], compiled))
        self.runtimes = {b.name: "torch" if b.compiled is None else "openvino" for b in self.backbones}
        self.dim = sum(get_spec(backbone).layers[layer].dim for backbone, layer in self.sources)

    @staticmethod
    def _input_name(geometry: Geometry, count: int) -> str:
        return "images" if count == 1 else f"images_{geometry.resize}_{geometry.crop}_{geometry.interpolation}"

    def preprocess_for(self, input_name: str) -> Preprocess:
        """A `Preprocess` with this input's geometry, for `pipeline.images.decode` (normalisation happens in
        the network, so its mean and std are not used by decoding)."""
        return next(b.preprocess for b in self.backbones if b.input == input_name)

    def features(self, batches: dict[str, np.ndarray]) -> np.ndarray:
        """One uint8 NHWC batch per input -> the head's feature rows (float32), as extraction computes them."""
        outputs: dict[tuple[str, str], np.ndarray] = {}
        for backbone in self.backbones:
            images = batches[backbone.input]
            if backbone.compiled is not None:
                rows_per_layer = backbone.compiled(images)
            else:
                rows_per_layer = forward(backbone.network, backbone.preprocess, images, self.device, self.precision)
            for layer, rows in rows_per_layer.items():
                outputs[(backbone.name, layer)] = rows
        return np.hstack([outputs[source] for source in self.sources])

    def module(self) -> nn.Module:
        """The fp32 export path: a module taking the inputs' uint8 batches (in `inputs` order) and returning
        the feature rows."""
        return FeatureGraph(self).eval()


class FeatureGraph(nn.Module):
    """uint8 NHWC batches -> float -> each backbone's normalisation and network -> pooled taps, side by side.
    The arithmetic is `forward`'s: (x - 255 mean) / (255 std) on the NCHW view of the NHWC batch."""

    def __init__(self, head: HeadNetwork) -> None:
        super().__init__()
        order = list(head.inputs)
        self.networks = nn.ModuleList([b.network for b in head.backbones])
        self.input_of = [order.index(b.input) for b in head.backbones]
        for i, b in enumerate(head.backbones):
            self.register_buffer(f"mean{i}", torch.tensor(b.preprocess.mean).view(1, 3, 1, 1) * 255)
            self.register_buffer(f"std{i}", torch.tensor(b.preprocess.std).view(1, 3, 1, 1) * 255)
        names = [b.name for b in head.backbones]
        self.order = [(names.index(backbone), layer) for backbone, layer in head.sources]

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for i, network in enumerate(self.networks):
            x = images[self.input_of[i]].permute(0, 3, 1, 2).float()
            outputs.append(network((x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")))
        return torch.cat([outputs[i][layer] for i, layer in self.order], 1)
