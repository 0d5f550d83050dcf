"""A fitted head saved as one file that cannot run code when it is loaded, with its SHA-256 beside it.

The file (`NAME.skops`, format 2) is a zip archive: the fitted scikit-learn Pipeline in skops's format
(`schema.json`, a JSON description of every object, and `.npy` arrays read with `allow_pickle=False`)
and `head.json`, the rest of the `HeadBundle`: the class names, the head's spec, which features it reads
(backbone, layer, precision, weights checksum, cache key), the metrics it reached and the library
versions. `unzip -p NAME.skops head.json` shows it.

Loading checks, in this order and before any object is built: the SHA-256 in `NAME.skops.sha256`
(catches a truncated or accidentally altered file; it is no protection against someone who can write
both files); `head.json`; that every backbone the head reads is registered; and that every type the
archive names is in `TRUSTED_TYPES` (exactly the scikit-learn and numpy types our heads are made of):
anything else is refused with the type named. Only then does skops build the Pipeline.

Heads saved by earlier versions (format 1) are joblib pickles, and unpickling runs whatever code the
file holds: they load only with `trust_pickle=True` (`--trust-pickle`), and `convert_bundle` rewrites
one as format 2.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.errors import BackboneError, PipelineError, first_line
from pipeline.core.hashing import bytes_sha256
from pipeline.core.io import atomic_write
from pipeline.features.sources import SourceMeta
from pipeline.heads.decision import DecisionRule, Decisions, decide
from pipeline.heads.spec import HeadSpec
from pipeline.models.registry import get_spec

if TYPE_CHECKING:
    from pipeline.heads.fit import FittedHead

FORMAT = 2  # 1: a joblib pickle of `to_disk()` (trusted files only); 2: skops archive + head.json
PICKLE_FORMAT = 1
METADATA = "head.json"  # the archive member with everything but the Pipeline

# Every type a saved head may contain, by the name skops records (module.qualname), and nothing more:
# what `fit_head` and `fit_incremental` build for each head type (checked by tests/test_hostile_loading.py
# against every head the tests fit). skops's own default list trusts every scikit-learn estimator; this
# one is narrower on purpose. A new head type that needs another type fails at save time, naming it.
SCALARS_NOT_SEEN = ("numpy.int32", "numpy.int64", "numpy.bool")
# In heads saved before calibration came (an SVM's Platt folds); heads fitted now use StratifiedFolds.
LEGACY_TYPES = ("sklearn.model_selection._split.StratifiedKFold",)
TRUSTED_TYPES: frozenset[str] = frozenset({
    # containers of the JSON description; skops records every JSON primitive as builtins.str
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.slice",
    # arrays (read with allow_pickle=False) and numpy scalars (int32, int64 and bool are not in the heads the
    # tests fit, but a fitted attribute may hold one: data, never code)
    "numpy.ndarray", "numpy.float32", "numpy.float64", *SCALARS_NOT_SEEN,
    # every head
    "sklearn.pipeline.Pipeline", "sklearn.preprocessing._data.StandardScaler",
    # logistic_regression (and pca_fusion's classifier)
    "sklearn.linear_model._logistic.LogisticRegression",
    # svm: the SVC calibrated by Platt scaling on the folds of a StratifiedKFold
    "sklearn.svm._classes.SVC", "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration", *LEGACY_TYPES,
    # knn
    "sklearn.neighbors._classification.KNeighborsClassifier",
    # pca_fusion
    "sklearn.decomposition._pca.PCA", "sklearn.compose._column_transformer.ColumnTransformer",
    "sklearn.feature_selection._variance_threshold.VarianceThreshold",
    "sklearn.feature_selection._univariate_selection.SelectKBest",
    "sklearn.feature_selection._univariate_selection.f_classif",
    # calibration (pipeline.heads.calibration): Platt and isotonic by scikit-learn, temperature ours
    "sklearn.isotonic.IsotonicRegression", "pipeline.heads.calibration.TemperatureScaling",
    "pipeline.heads.calibration.StratifiedFolds",  # the folds a calibration was fitted on
    # out-of-core heads (pipeline.heads.outofcore): SGD with log-loss, incremental PCA
    "sklearn.linear_model._stochastic_gradient.SGDClassifier", "sklearn._loss._loss.CyHalfBinomialLoss",
    "sklearn.decomposition._incremental_pca.IncrementalPCA", "pipeline.heads.outofcore.FusedIncrementalPCA",
    # zero_shot (class embeddings and a scale: arrays and numbers), and the zero_shot_prior of logistic_regression
    "pipeline.heads.zero_shot.ZeroShotClassifier", "pipeline.heads.zero_shot.ZeroShotBlend",
})


class BundleError(PipelineError):
    """A saved head is missing, altered, unsafe to load, or needs a backbone this installation does not have."""


class PickleRefused(BundleError):
    """A format-1 head (a pickle) and no `trust_pickle`."""


def _versions() -> dict:
    import numpy
    import sklearn
    import skops
    import torch

    return {"scikit-learn": sklearn.__version__, "skops": skops.__version__, "numpy": numpy.__version__,
            "torch": torch.__version__}


class HeadMetrics(BaseModel):
    """What a head reached: test scores where the fit had a test split, and its cross-validation."""

    model_config = ConfigDict(extra="forbid")

    accuracy: float | None = None
    macro_f1: float | None = None
    balanced_accuracy: float | None = None
    cv_accuracy: float | None  # None: a single setting, fitted without cross-validation
    best_params: dict[str, Any]
    fit_seconds: float


class HeadBundle(BaseModel):
    """What a saved head holds: its fitted Pipeline, the class names, its spec, the features it reads
    (`SourceMeta`), its metrics and the library versions it was fitted with.

    On disk the Pipeline is skops's part of the archive and the rest is `head.json` (`metadata`); a
    format-1 head was a plain dict (`to_disk`). `from_disk` validates either at that boundary."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    pipeline: Any  # a fitted scikit-learn Pipeline
    classes: list[str]
    head: HeadSpec
    sources: list[SourceMeta]
    metrics: HeadMetrics
    decision: DecisionRule = Field(default_factory=DecisionRule)  # absent from heads saved before it existed
    versions: dict[str, str] = Field(default_factory=lambda: _versions())

    @classmethod
    def of(cls, fitted: FittedHead, classes: list[str], sources: list[SourceMeta], **scores: float) -> HeadBundle:
        """A fitted head's bundle; `scores` (test accuracy, macro-F1 and balanced accuracy, where there is a
        test split) join its cross-validation metrics."""
        return cls(pipeline=fitted.pipeline, classes=classes, head=fitted.spec, sources=sources,
                   decision=fitted.decision,
                   metrics=HeadMetrics(**scores, cv_accuracy=fitted.cv_accuracy, best_params=fitted.best_params,
                                       fit_seconds=fitted.fit_seconds))

    def decide(self, proba: Any) -> Decisions:
        """The head's answers for probabilities of its classes (`predict_proba` of its Pipeline): the class,
        or unknown below its reject threshold (`pipeline.heads.decision`); what a server calls."""
        return decide(self.decision, proba)

    def metadata(self) -> dict:
        """Everything but the Pipeline, as JSON values, with the format: `head.json`."""
        unscored = {key for key in ("accuracy", "macro_f1", "balanced_accuracy") if getattr(self.metrics, key) is None}
        return {"format": FORMAT, **self.model_dump(mode="json", exclude={"pipeline": True, "metrics": unscored})}

    def to_disk(self) -> dict:
        """The format-1 dict (what a joblib head held): the metadata and the Pipeline."""
        return {**self.metadata(), "pipeline": self.pipeline, "format": PICKLE_FORMAT}

    @classmethod
    def from_disk(cls, data: object, path: Path, fmt: int = FORMAT) -> HeadBundle:
        if not isinstance(data, dict) or data.get("format") != fmt:
            found = data.get("format") if isinstance(data, dict) else None
            newer = isinstance(found, int) and found > FORMAT
            raise BundleError(f"{path} is not a model bundle written by this version of the pipeline"
                              + (f" (format {found}: written by a newer version)" if newer else ""))
        try:
            return cls.model_validate({k: v for k, v in data.items() if k != "format"})
        except ValidationError as exc:
            raise BundleError(f"{path} is not a model bundle written by this version of the pipeline "
                              f"({first_line(exc.errors()[0]['msg'])} at {exc.errors()[0]['loc']})") from None


def types_in(schema: object) -> set[str]:
    """Every type a skops `schema.json` names (`module.class` of each object it describes), read from the
    JSON alone: nothing is imported or built. A node of skops's tree is a JSON object with both keys."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            module, name = item.get("__module__"), item.get("__class__")
            if "__module__" in item or "__class__" in item:
                found.add(f"{module}.{name}" if isinstance(module, str) and isinstance(name, str)
                          else f"{module!r}.{name!r}")  # malformed: named, and never trusted
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _refuse_untrusted(schema: object, path: Path | str, verb: str) -> None:
    untrusted = sorted(types_in(schema) - TRUSTED_TYPES)
    if untrusted:
        more = f" (and {len(untrusted) - 1} more: {', '.join(untrusted[1:4])}{', ...' if len(untrusted) > 4 else ''})"
        raise BundleError(f"{path}: refusing to {verb} type {untrusted[0]}{more if len(untrusted) > 1 else ''}, "
                          "which is not among the types a saved head may hold (pipeline.heads.bundle.TRUSTED_TYPES)")


def _archive(bundle: HeadBundle, path: Path) -> bytes:
    """The format-2 file's bytes: skops's archive of the Pipeline with `head.json` added to it."""
    import skops.io as sio

    data = sio.dumps(bundle.pipeline, compression=zipfile.ZIP_DEFLATED)
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        _refuse_untrusted(json.loads(archive.read("schema.json")), path, "save")
        archive.writestr(METADATA, json.dumps(bundle.metadata(), indent=1))
    return buffer.getvalue()


def save_bundle(path: str | os.PathLike, bundle: HeadBundle) -> Path:
    """Write `path` (format 2) and `path.sha256` (in `sha256sum` format, so `sha256sum -c` checks it too),
    each atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _archive(bundle, path)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    with atomic_write(path.with_name(path.name + ".sha256")) as fh:
        fh.write(f"{bytes_sha256(data)}  {path.name}\n")
    return path


def _checked_bytes(path: Path) -> bytes:
    """The file's bytes, read once, matched against its `.sha256`: what is checked is what is loaded."""
    checksum = path.with_name(path.name + ".sha256")
    if not checksum.is_file():
        raise BundleError(f"{checksum.name} is missing beside {path}: refusing to load an unverified model file")
    try:
        data, words = path.read_bytes(), checksum.read_text(errors="replace").split()
    except OSError as exc:
        raise BundleError(f"cannot read {exc.filename or path}: {exc.strerror or exc}") from None
    if bytes_sha256(data) != (words[0] if words else ""):
        raise BundleError(f"{path} does not match its checksum in {checksum.name}: the file was altered or "
                          "truncated; refusing to load it")
    return data


def _check_backbones(bundle_sources: list[SourceMeta], path: Path) -> None:
    for source in bundle_sources:
        try:
            spec = get_spec(source.backbone)
        except BackboneError as exc:
            raise BundleError(f"{path} needs backbone {source.backbone!r}, which is not registered here "
                              f"({exc})") from None
        spec.layer(source.layer)


def _load_archive(data: bytes, path: Path) -> HeadBundle:
    """A format-2 head: metadata and backbones first, then the types, then skops builds the Pipeline."""
    import skops.io as sio
    from sklearn.pipeline import Pipeline

    not_ours = f"{path} is not a model bundle written by this version of the pipeline"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
            if METADATA not in names or "schema.json" not in names:
                raise BundleError(f"{not_ours} (a zip archive without {METADATA} and schema.json)")
            metadata = json.loads(archive.read(METADATA))
            schema = json.loads(archive.read("schema.json"))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{not_ours} ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(metadata, dict):
        raise BundleError(f"{not_ours} ({METADATA} is not a JSON object)")
    bundle = HeadBundle.from_disk({**metadata, "pipeline": None}, path)
    _check_backbones(bundle.sources, path)
    _refuse_untrusted(schema, path, "load")
    try:
        pipeline = sio.loads(data, trusted=sorted(TRUSTED_TYPES))
    except Exception as exc:  # skops refuses, or the libraries here cannot rebuild an object
        raise BundleError(f"{path} cannot be loaded with the libraries installed here "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(pipeline, Pipeline):
        raise BundleError(f"{not_ours} (it holds a {type(pipeline).__name__}, not a scikit-learn Pipeline)")
    bundle.pipeline = pipeline
    return bundle


def _load_pickle(data: bytes, path: Path) -> HeadBundle:
    """A format-1 head: a joblib pickle, which runs whatever code it holds. Only for trusted files."""
    import joblib

    try:
        content = joblib.load(io.BytesIO(data))
    except Exception as exc:  # unpickling fails in many ways when library versions differ
        raise BundleError(f"{path} cannot be loaded with the libraries installed here "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    bundle = HeadBundle.from_disk(content, path, PICKLE_FORMAT)
    _check_backbones(bundle.sources, path)
    return bundle


def load_bundle(path: str | os.PathLike, trust_pickle: bool = False) -> HeadBundle:
    """Load a saved head; see the module's docstring for the checks. A file that is not a zip archive is
    taken for a format-1 pickle and is unpickled only with `trust_pickle`: the file's content decides,
    not its name, and a zip archive is never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"model file not found: {path}")
    data = _checked_bytes(path)
    if zipfile.is_zipfile(io.BytesIO(data)):
        return _load_archive(data, path)
    if not trust_pickle:
        raise PickleRefused(f"{path} is a pickle (a head saved by an earlier version, format {PICKLE_FORMAT}), and "
                          "loading a pickle runs any code it holds: re-fit the head, or, if you trust the file, "
                          f"pass --trust-pickle or convert it once with `pipeline convert-head {path} "
                          "NEW.skops --trust-pickle`")
    return _load_pickle(data, path)


def convert_bundle(old: str | os.PathLike, new: str | os.PathLike, trust_pickle: bool = False) -> HeadBundle:
    """Rewrite a saved head (a format-1 pickle, with `trust_pickle`) as a format-2 file at `new`; its
    versions stay those it was fitted with."""
    bundle = load_bundle(old, trust_pickle)
    save_bundle(new, bundle)
    return bundle
