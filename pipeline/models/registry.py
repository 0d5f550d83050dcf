"""Registry of frozen pretrained backbones by name: register, get, list (timm's style).

Each entry carries everything that changes the numbers it produces (weights file, preprocessing,
tap points), in the spirit of torchvision's weights API, so the feature cache can key on it.

Nothing is built at import, and importing this module imports neither torch nor torchvision:

- `register(name, factory)` records a zero-argument factory; `get_spec(name)` calls it the first
  time and keeps the `BackboneSpec` it returns. `list_backbones()` returns names only.
- The built-in backbones (`pipeline.models.zoo`) are registered the first time the registry is used.
- Backbones from elsewhere, in every process that needs them (the CLI, Dask workers), come from
  plugins: `PIPELINE_PLUGINS` holds comma-separated entries `package.module` or
  `package.module:function`; on each query the registry imports every entry it has not loaded yet
  and calls the function, which calls `register` (the module must be importable: on `sys.path`,
  for example through `PYTHONPATH`). A plugin may replace a built-in name.
- Saved (fine-tuned) backbones are read from `<folder>/<name>/backbone.json` manifests in the
  folders of `PIPELINE_BACKBONES` (default `backbones/`); each names the registered parent whose
  network it fills with its own weights, so it cannot stand alone. A registered name wins.

- Families: `register_family(prefix, factory)` answers every name starting with `prefix` (`timm.NAME`
  for any timm model) with `factory(name)`, built on first use like a registered name.

Weights come through `pipeline.models.download` (an explicit file, files on disk, or a pinned download).
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import BackboneError, first_line
from pipeline.images.preprocess import Preprocess
from pipeline.models.download import RemoteFile

if TYPE_CHECKING:
    from torch import nn

PLUGINS_ENV = "PIPELINE_PLUGINS"
BACKBONES_ENV = "PIPELINE_BACKBONES"
MANIFEST = "backbone.json"
MANIFEST_FORMAT = 1


POOLS = ("cls", "mean", "cls_mean")  # how a token layer (batch, tokens, dim) becomes one vector


@dataclass(frozen=True)
class Layer:
    """A tap point: the output of `module` (a dotted path in the network; "" is the network's own output).
    A feature map is globally average-pooled; a token sequence is pooled by `pool` (one of POOLS): the
    class token, the mean of the patch tokens (the `prefix` leading class and register tokens left out),
    or both concatenated. A `twin` layer of a twin network (`pipeline.models.twin`) runs on both streams:
    its pooled features are the parent's and the fine-tuned ones side by side (`dim` counts both)."""

    module: str
    dim: int
    pool: str = ""
    prefix: int = 0
    twin: bool = False


@dataclass(frozen=True)
class Card:
    """What a user weighs before downloading: licence, size of the network, the published figure (cited)."""

    licence: str
    params_m: float  # millions of parameters of the feature network
    published: str = ""  # e.g. "84.6% ImageNet linear probe"
    citation: str = ""  # where that figure is published


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]
    locate_weights: Callable[[], Path]
    preprocess: Preprocess
    layers: dict[str, Layer]
    default_layer: str
    source: str = ""
    load_categories: Callable[[], tuple[str, ...]] = field(default=tuple, repr=False)  # class names, on demand
    weights_sha256: str | None = None  # set for saved (fine-tuned) backbones: their file must match it
    parent: str | None = None  # the backbone a saved one was fine-tuned from
    trained_on: Path | None = None  # a saved one's list of the content ids of the images that trained its network
    # modules OpenVINO keeps in f32 when it runs the rest in bf16, where bf16 loses most (features.openvino_precise)
    openvino_f32: tuple[str, ...] = ()
    remote: RemoteFile | None = None  # where its weights are downloaded from, and their pin
    card: Card | None = None
    load_network: Callable[[Path], nn.Module] | None = None  # builds it with a weights file (else build + state dict)

    @property
    def categories(self) -> tuple[str, ...]:
        """The class names of the network's own classifier (ImageNet's for the built-ins), loaded on
        first use: for some they come from torchvision, which takes seconds to import."""
        return self.load_categories()

    def layer(self, name: str | None) -> str:
        """Resolve a layer name (None means the default), refusing unknown ones with the choices."""
        name = name or self.default_layer
        if name not in self.layers:
            raise BackboneError(f"backbone {self.name!r} has no layer {name!r}; "
                                f"choose one of: {', '.join(self.layers)}")
        return name


SpecFactory = Callable[[], BackboneSpec]

_FACTORIES: dict[str, SpecFactory] = {}
_FAMILIES: dict[str, Callable[[str], BackboneSpec]] = {}
_SPECS: dict[str, BackboneSpec] = {}  # factories already called
_LOADED_PLUGINS: set[str] = set()
_LOCK = threading.RLock()  # a factory may itself ask for another backbone's spec
_builtins_registered = False


def register(name: str, factory: SpecFactory) -> SpecFactory:
    """Register (or replace) backbone `name`; `factory()` builds its spec on first use. Returns `factory`."""
    _ensure_builtin()
    with _LOCK:
        _FACTORIES[name] = factory
        _SPECS.pop(name, None)
    return factory


def register_family(prefix: str, factory: Callable[[str], BackboneSpec]) -> None:
    """Answer every name `prefix + rest` with `factory(name)` (not listed: there may be thousands)."""
    with _LOCK:
        _FAMILIES[prefix] = factory


def families() -> list[str]:
    _ensure_registered()
    return sorted(_FAMILIES)


def list_backbones() -> list[str]:
    """Every registered and saved backbone's name, sorted; builds nothing."""
    _ensure_registered()
    return sorted({**_user_specs(), **_FACTORIES})


def get_spec(name: str) -> BackboneSpec:
    _ensure_registered()
    with _LOCK:
        if name in _SPECS:
            return _SPECS[name]
        factory = _FACTORIES.get(name)
        if factory is not None:
            spec = factory()
            if spec.name != name:
                raise BackboneError(f"the factory registered as {name!r} built a backbone named {spec.name!r}")
            _SPECS[name] = spec
            return spec
        family = next((f for prefix, f in _FAMILIES.items() if name.startswith(prefix)), None)
        if family is not None:
            _SPECS[name] = family(name)
            return _SPECS[name]
    spec = _user_specs().get(name)
    if spec is None:
        raise BackboneError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}, and "
                            f"{', '.join(p + 'NAME' for p in sorted(_FAMILIES))} "
                            f"(saved backbones are looked up in {', '.join(map(str, backbone_dirs()))}; "
                            f"set {BACKBONES_ENV} to search elsewhere)")
    return spec


def _ensure_builtin() -> None:
    """Register the built-in backbones once, the first time the registry is used."""
    global _builtins_registered
    with _LOCK:
        if _builtins_registered:
            return
        _builtins_registered = True  # first: the zoo's own `register` calls come back through here
        try:
            from pipeline.models import zoo

            zoo.register_builtins()
        except BaseException:
            _builtins_registered = False
            raise


def _ensure_registered() -> None:
    """Built-ins, then every plugin named in $PIPELINE_PLUGINS not loaded yet (read on each query)."""
    _ensure_builtin()
    for entry in plugin_entries():
        with _LOCK:
            if entry in _LOADED_PLUGINS:
                continue
            module_name, _, function = entry.partition(":")
            try:
                module = importlib.import_module(module_name)
                if function:
                    getattr(module, function)()
            except BackboneError:
                raise
            except Exception as exc:  # import errors, a missing function, or the function failing
                raise BackboneError(f"cannot load backbone plugin {entry!r} named in {PLUGINS_ENV}: "
                                    f"{type(exc).__name__}: {first_line(exc)}") from exc
            _LOADED_PLUGINS.add(entry)


def plugin_entries() -> list[str]:
    """The `module` or `module:function` entries of $PIPELINE_PLUGINS, in order."""
    return [entry.strip() for entry in os.environ.get(PLUGINS_ENV, "").split(",") if entry.strip()]


# --------------------------------------------------------------------------- saved (fine-tuned) backbones

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
        layers = {name: Layer(layer["module"], int(layer["dim"]), layer.get("pool", ""), int(layer.get("prefix", 0)),
                              bool(layer.get("twin", False)))
                  for name, layer in manifest["layers"].items()}
        name, parent, twin = manifest["name"], manifest["parent"], [str(p) for p in manifest.get("twin", [])]
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r} is not {MANIFEST_FORMAT}")
        return BackboneSpec(name=name, build=partial(_build_saved, parent, twin), locate_weights=lambda: weights,
                            preprocess=pre, layers=layers, default_layer=manifest["default_layer"],
                            source=f"fine-tuned from {parent}{', a twin with it (finetune --ensemble)' if twin else ''}"
                                   f" ({path})",
                            load_categories=lambda: tuple(manifest.get("classes", ())),
                            weights_sha256=manifest["weights_sha256"], parent=parent,
                            trained_on=path.parent / manifest["trained_on"] if "trained_on" in manifest else None,
                            openvino_f32=tuple(str(m) for m in manifest.get("openvino_f32", ())))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackboneError(f"saved backbone manifest {path} is unusable: {first_line(exc)}") from None


def _build_saved(parent: str, twin: list[str]) -> nn.Module:
    """The network of a saved backbone before its weights are loaded: the parent's architecture, or for an
    ensemble of the parent with its fine-tuned copy a twin of two (`pipeline.models.twin`)."""
    if not twin:
        return get_spec(parent).build()
    from pipeline.models.twin import make_twin

    spec = get_spec(parent)
    return make_twin(spec.build(), spec.build(), twin)


def _user_specs() -> dict[str, BackboneSpec]:
    """Saved backbones, read from their manifests each time (they are small; a new one appears at once).
    A registered name always wins, and the first folder holding a name wins over later ones."""
    specs: dict[str, BackboneSpec] = {}
    for folder in backbone_dirs():
        for manifest in sorted(folder.glob(f"*/{MANIFEST}")):
            spec = _spec_from_manifest(manifest)
            if spec.name not in _FACTORIES:
                specs.setdefault(spec.name, spec)
    return specs


def manifest_for(name: str, parent: BackboneSpec, weights: str, weights_sha256: str, extra: dict,
                 layers: dict[str, Layer] | None = None, twin: list[str] | None = None) -> dict:
    """The manifest of saved backbone `name`: its weights file and checksum, and the parent's
    preprocessing, tap points and modules OpenVINO keeps in f32 (fine-tuning changes the weights, not the
    architecture); a twin's (`twin`: its changed modules) names its own `layers`."""
    layers = parent.layers if layers is None else layers
    return {"format": MANIFEST_FORMAT, "name": name, "parent": parent.name, "weights": weights,
            "weights_sha256": weights_sha256, "preprocess": parent.preprocess.as_dict(),
            "layers": {k: {"module": v.module, "dim": v.dim, **({"pool": v.pool, "prefix": v.prefix} if v.pool else {}),
                           **({"twin": True} if v.twin else {})}
                       for k, v in layers.items()},
            "default_layer": parent.default_layer, **({"twin": list(twin)} if twin else {}),
            **({"openvino_f32": list(parent.openvino_f32)} if parent.openvino_f32 else {}), **extra}
