"""A fitted head saved as one joblib bundle, with its SHA-256 in a file beside it.

The bundle holds everything needed to use the head later on new images: the Pipeline, the class
names, which features it reads (backbone, layer, precision, weights checksum, cache key), the
metrics it reached and the library versions. Loading checks the checksum before unpickling
anything, and refuses a head whose backbone is not registered or whose weights have changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import joblib

from pipeline.core.errors import BackboneError, PipelineError, first_line
from pipeline.core.hashing import file_sha256
from pipeline.models.registry import get_spec

if TYPE_CHECKING:
    from pipeline.heads.fit import FittedHead

FORMAT = 1


class BundleError(PipelineError):
    """A saved head is missing, altered, or needs a backbone this installation does not have."""


def _versions() -> dict:
    import sklearn
    import torch

    return {"scikit-learn": sklearn.__version__, "joblib": joblib.__version__, "torch": torch.__version__}


def head_bundle(fitted: FittedHead, classes: list[str], sources: list[dict], **scores: float) -> dict:
    """What a saved head holds: its Pipeline, classes, spec and sources (`source_meta`); `scores`
    (test accuracy and macro-F1, where there is a test split) join its cross-validation metrics."""
    return {"pipeline": fitted.pipeline, "classes": classes, "head": vars(fitted.spec), "sources": sources,
            "metrics": {**scores, "cv_accuracy": fitted.cv_accuracy, "best_params": fitted.best_params,
                        "fit_seconds": fitted.fit_seconds}}


def save_bundle(path: str | os.PathLike, bundle: dict) -> Path:
    """Write `path` and `path.sha256` (in `sha256sum` format, so `sha256sum -c` checks it too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    joblib.dump({**bundle, "format": FORMAT, "versions": _versions()}, tmp)
    os.replace(tmp, path)
    path.with_name(path.name + ".sha256").write_text(f"{file_sha256(path)}  {path.name}\n")
    return path


def load_bundle(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"model file not found: {path}")
    checksum = path.with_name(path.name + ".sha256")
    if not checksum.is_file():
        raise BundleError(f"{checksum.name} is missing beside {path}: refusing to load an unverified model file")
    expected = checksum.read_text().split()[0] if checksum.read_text().split() else ""
    if file_sha256(path) != expected:
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
