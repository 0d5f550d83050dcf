"""Backbone weights: finding the file, checksumming it, loading it into the network, saving a new one.

Weights come from a file the user names, a registry package (Lite), or `pipeline.models.download`
(files already on disk, else a pinned download when downloads are allowed); a missing file is a
`BackboneError` that says where to put it. A state dict is read with `weights_only=True` (or as
safetensors, by timm), so a weights file cannot run code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import BackboneError, PipelineError, first_line
from pipeline.core.hashing import file_sha256 as _sha256
from pipeline.core.io import atomic_write, make_folder, write_json_atomic
from pipeline.models.download import on_disk
from pipeline.models.registry import MANIFEST, BackboneSpec, Layer, get_spec, manifest_for

if TYPE_CHECKING:
    from torch import nn


def file_sha256(path: Path) -> str:
    """SHA-256 of a weights file, memoised on (path, size, mtime): weights files are hashed often."""
    return _sha256(path, memo=True)


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    network: nn.Module
    weights_path: Path
    weights_sha256: str


def weights_on_disk(spec: BackboneSpec) -> Path | None:
    """The weights file of `spec` if it is on disk now (never downloads, never hashes: for listings)."""
    if spec.remote is not None:
        return on_disk(spec.remote)
    try:
        path = spec.locate_weights()
    except PipelineError:
        return None
    return path if path.is_file() else None


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
    if spec.load_network is not None and spec.weights_sha256 is None:  # timm loads its own files
        network = spec.load_network(path)
        network.eval().requires_grad_(False)
        return LoadedBackbone(spec, network, path, file_sha256(path))
    import torch

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


TRAINED_ON = "trained_on.txt"  # beside a saved backbone's manifest: the images that trained its network


def save_backbone(root: str | os.PathLike, name: str, parent: BackboneSpec, state: dict, extra: dict,
                  layers: dict[str, Layer] | None = None, twin: list[str] | None = None,
                  trained_on: Iterable[str] = ()) -> Path:
    """Write `root/name/weights.pth` and its manifest (checksum, parent, preprocessing, layers: the
    parent's unless `layers`; `twin`: the changed modules of a twin network); `trained_on`, the content
    ids of the images that trained the network, go in `TRAINED_ON`, one a line. The manifest is written
    last and atomically, so a killed save never leaves a loadable half."""
    import torch

    folder = make_folder(Path(root) / name)
    weights = folder / "weights.pth"
    with atomic_write(weights, "wb") as fh:
        torch.save(state, fh)
    ids = sorted(set(trained_on))
    if ids:
        with atomic_write(folder / TRAINED_ON) as fh:
            fh.write("".join(f"{image_id}\n" for image_id in ids))
        extra = {**extra, "trained_on": TRAINED_ON}
    manifest = manifest_for(name, parent, weights.name, file_sha256(weights), extra, layers, twin)
    write_json_atomic(folder / MANIFEST, manifest)
    return folder
