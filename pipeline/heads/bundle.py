"""A fitted head saved as one joblib bundle, with its SHA-256 in a file beside it.

The bundle (`HeadBundle`) holds everything needed to use the head later on new images: the Pipeline,
the class names, which features it reads (backbone, layer, precision, weights checksum, cache key),
the metrics it reached and the library versions. Loading checks the checksum before unpickling
anything, and refuses a head whose backbone is not registered or whose weights have changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.errors import BackboneError, PipelineError, first_line
from pipeline.core.hashing import file_sha256
from pipeline.features.sources import SourceMeta
from pipeline.heads.spec import HeadSpec
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


class HeadMetrics(BaseModel):
    """What a head reached: test scores where the fit had a test split, and its cross-validation."""

    model_config = ConfigDict(extra="forbid")

    accuracy: float | None = None
    macro_f1: float | None = None
    cv_accuracy: float | None  # None: a single setting, fitted without cross-validation
    best_params: dict[str, Any]
    fit_seconds: float


class HeadBundle(BaseModel):
    """What a saved head holds: its fitted Pipeline, the class names, its spec, the features it reads
    (`SourceMeta`), its metrics and the library versions it was fitted with.

    On disk it is a plain dict (with `format`), so heads saved by earlier versions load unchanged:
    `to_disk` and `from_disk` convert at that boundary."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    pipeline: Any  # a fitted scikit-learn Pipeline
    classes: list[str]
    head: HeadSpec
    sources: list[SourceMeta]
    metrics: HeadMetrics
    versions: dict[str, str] = Field(default_factory=lambda: _versions())

    @classmethod
    def of(cls, fitted: FittedHead, classes: list[str], sources: list[SourceMeta], **scores: float) -> HeadBundle:
        """A fitted head's bundle; `scores` (test accuracy and macro-F1, where there is a test split) join
        its cross-validation metrics."""
        return cls(pipeline=fitted.pipeline, classes=classes, head=fitted.spec, sources=sources,
                   metrics=HeadMetrics(**scores, cv_accuracy=fitted.cv_accuracy, best_params=fitted.best_params,
                                       fit_seconds=fitted.fit_seconds))

    def to_disk(self) -> dict:
        unscored = {key for key in ("accuracy", "macro_f1") if getattr(self.metrics, key) is None}
        return {**self.model_dump(exclude={"pipeline": True, "metrics": unscored}), "pipeline": self.pipeline,
                "format": FORMAT}

    @classmethod
    def from_disk(cls, data: object, path: Path) -> HeadBundle:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"{path} is not a model bundle written by this version of the pipeline")
        try:
            return cls.model_validate({k: v for k, v in data.items() if k != "format"})
        except ValidationError as exc:
            raise BundleError(f"{path} is not a model bundle written by this version of the pipeline "
                              f"({first_line(exc.errors()[0]['msg'])} at {exc.errors()[0]['loc']})") from None


def save_bundle(path: str | os.PathLike, bundle: HeadBundle) -> Path:
    """Write `path` and `path.sha256` (in `sha256sum` format, so `sha256sum -c` checks it too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    joblib.dump(bundle.to_disk(), tmp)
    os.replace(tmp, path)
    path.with_name(path.name + ".sha256").write_text(f"{file_sha256(path)}  {path.name}\n")
    return path


def load_bundle(path: str | os.PathLike) -> HeadBundle:
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
        data = joblib.load(path)
    except Exception as exc:  # unpickling fails in many ways when library versions differ
        raise BundleError(f"{path} cannot be loaded with the libraries installed here "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    bundle = HeadBundle.from_disk(data, path)
    for source in bundle.sources:
        try:
            spec = get_spec(source.backbone)
        except BackboneError as exc:
            raise BundleError(f"{path} needs backbone {source.backbone!r}, which is not registered here "
                              f"({exc})") from None
        spec.layer(source.layer)
    return bundle
