"""Backbone weights: finding the file, checksumming it, loading it into the network, saving a new one.

Weights are never downloaded: they come from a registry package, the torch hub cache, or a file
the user names; a missing file is a `BackboneError` that says where to put it. A state dict is read
with `weights_only=True`, so a weights file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from pipeline.core.errors import BackboneError, first_line
from pipeline.models.registry import MANIFEST, BackboneSpec, get_spec, manifest_for


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


def save_backbone(root: str | os.PathLike, name: str, parent: BackboneSpec, state: dict, extra: dict) -> Path:
    """Write `root/name/weights.pth` and its manifest (checksum, parent, preprocessing, layers); the
    manifest is written last and atomically, so a killed save never leaves a loadable half."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.pth"
    tmp = folder / ".weights.pth.tmp"
    torch.save(state, tmp)
    os.replace(tmp, weights)
    manifest = manifest_for(name, parent, weights.name, file_sha256(weights), extra)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return folder
