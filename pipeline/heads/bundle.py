"""A fitted head saved as one joblib bundle, with its SHA-256 in a file beside it.

The bundle holds everything needed to use the head later on new images: the Pipeline, the class
names, which features it reads (backbone, layer, precision, weights checksum, cache key), the
metrics it reached and the library versions. Loading checks the checksum before unpickling
anything, and refuses a head whose backbone is not registered or whose weights have changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import joblib

from pipeline.core.errors import BackboneError, PipelineError, first_line
from pipeline.models.registry import get_spec

FORMAT = 1


class BundleError(PipelineError):
    """A saved head is missing, altered, or needs a backbone this installation does not have."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _versions() -> dict:
    import sklearn
    import torch

    return {"scikit-learn": sklearn.__version__, "joblib": joblib.__version__, "torch": torch.__version__}


def save_bundle(path: str | os.PathLike, bundle: dict) -> Path:
    """Write `path` and `path.sha256` (in `sha256sum` format, so `sha256sum -c` checks it too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    joblib.dump({**bundle, "format": FORMAT, "versions": _versions()}, tmp)
    os.replace(tmp, path)
    path.with_name(path.name + ".sha256").write_text(f"{_sha256(path)}  {path.name}\n")
    return path


def load_bundle(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"model file not found: {path}")
    checksum = path.with_name(path.name + ".sha256")
    if not checksum.is_file():
        raise BundleError(f"{checksum.name} is missing beside {path}: refusing to load an unverified model file")
    expected = checksum.read_text().split()[0] if checksum.read_text().split() else ""
    if _sha256(path) != expected:
        raise BundleError(f"{path} does not match its checksum in {checksum.name}: the file was altered or "
                          "truncated; refusing to load it")
    try:
        bundle = joblib.load(path)
    except Exception as exc:  # unpickling fails in many ways when library versions differ
        raise BundleError(f"{path} cannot be loaded with the libraries installed here "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise BundleError(f"{path} is not a model bundle written by this version of the pipeline")
    for source in bundle["sources"]:
        try:
            spec = get_spec(source["backbone"])
        except BackboneError as exc:
            raise BundleError(f"{path} needs backbone {source['backbone']!r}, which is not registered here "
                              f"({exc})") from None
        spec.layer(source["layer"])
    return bundle
