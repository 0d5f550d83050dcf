"""What a head is, before anything is fitted: the typed options of each head type (the `heads:` entries
of a run config, with their cross-validation grids as defaults) and the resolved `HeadSpec`.

No scikit-learn here: the command line needs the head types when it builds its parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args

from pydantic import Discriminator, Field, PositiveInt

from pipeline.core.names import SAFE_NAME_RULE
from pipeline.core.schema import NonNegativeFinite, PositiveFinite, SafeName, Section, option
from pipeline.heads.trust_options import (
    CALIBRATIONS,
    RejectOptions,
    TrustOptions,
    WeightedOptions,
    calibration_option,
    reject_option,
)

T = TypeVar("T")
# The values cross-validation chooses from; a head option takes one value (fitted once, no CV) or a Grid.
Grid = Annotated[list[T], Field(min_length=1)]
SOURCE = "BACKBONE or BACKBONE:LAYER"
HEAD_SUFFIX = ".skops"  # a saved head's file (pipeline.heads.bundle): heads/<name>.skops
OLD_HEAD_SUFFIX = ".joblib"  # a head saved by an earlier version (a pickle: loads only with --trust-pickle)
# CLIP's prompt ensemble for ImageNet, the 7-template subset its authors selected (CLIP repository,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb): "{}" is replaced by the class's words.
DEFAULT_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                     "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
Template = Annotated[str, Field(pattern=r"^[^{}]*\{\}[^{}]*$")]
UnitInterval = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
_SOURCE_ABOUT = ("the features it reads (default: the first of features.backbones at its default layer); "
                 "a backbone must be among features.backbones")


class HeadOptions(Section):
    """What every head has: a name (it names the saved file) and a type."""

    name: SafeName = option(accepts=f"{SAFE_NAME_RULE} (it names the saved file)",
                            about=f"the head's name: heads/<name>{HEAD_SUFFIX} and its key in metrics.json")
    fuses: ClassVar[bool] = False  # reads every backbone by default (else the first)

    def given_sources(self) -> list[str] | None:
        """The sources the config names (`source` or `sources`), None when it names none."""
        value = getattr(self, "sources", None) or getattr(self, "source", None)
        return [value] if isinstance(value, str) else value

    def options(self) -> dict[str, Any]:
        """The type's options (its grids included), without name, type and sources."""
        return self.model_dump(exclude={"name", "type", "source", "sources"})


class LogisticRegressionHead(WeightedOptions, TrustOptions, HeadOptions):
    """Multinomial logistic regression on standardised features."""

    type: Literal["logistic_regression"]
    source: str | None = option(None, accepts=SOURCE, about=_SOURCE_ABOUT)
    C: PositiveFinite | Grid[PositiveFinite] = option(
        [0.01, 0.1, 1.0, 10.0], accepts="a finite positive number or a list of them",
        about="inverse regularisation strength; a list is a grid for cross-validation")
    zero_shot_prior: UnitInterval | Grid[UnitInterval] | None = option(
        None, accepts="a number in [0, 1], a list of them, or null",
        about="pool the regression with the zero-shot classifier of its CLIP backbone (default prompts): the "
              "zero-shot classifier's weight in log space, 0 the regression alone; a list is a grid for "
              "cross-validation; null: no prior. Needs a CLIP backbone's embedding layer")


class SvmHead(WeightedOptions, TrustOptions, HeadOptions):
    """A support-vector machine, with probabilities by Platt scaling on out-of-fold decisions."""

    type: Literal["svm"]
    # measured by cross-validation inside the training folders (benchmarks/RESULTS.md, "Calibration"): its Platt
    # scaling alone is over- or under-confident (mean ECE 0.111); sigmoid on top of it has the lowest log-loss in
    # 7 of 9 folds (ECE 0.034), for six times the SVM fits of the final model
    calibration: Literal[CALIBRATIONS] = calibration_option("sigmoid")  # type: ignore[valid-type]
    source: str | None = option(None, accepts=SOURCE, about=_SOURCE_ABOUT)
    kernel: Literal["linear", "rbf"] = option("rbf", accepts="linear or rbf", about="the SVM's kernel")
    C: PositiveFinite | Grid[PositiveFinite] = option(
        [0.1, 1.0, 10.0], accepts="a finite positive number or a list of them",
        about="inverse regularisation strength; a list is a grid for cross-validation")
    gamma: Literal["scale", "auto"] | PositiveFinite | Grid[Literal["scale", "auto"] | PositiveFinite] = option(
        ["scale", 1e-4], accepts="scale, auto, a finite positive number, or a list of them",
        about="the rbf kernel's width (unused by linear); a list is a grid for cross-validation")


class KnnHead(TrustOptions, HeadOptions):
    """k nearest neighbours by cosine distance, weighted by distance."""

    type: Literal["knn"]
    # measured by cross-validation inside the training folders (benchmarks/RESULTS.md, "Calibration"): sigmoid has
    # the lowest log-loss on all three sets; temperature spreads kNN's vote shares badly on dtd10 and intel6
    calibration: Literal[CALIBRATIONS] = calibration_option("sigmoid")  # type: ignore[valid-type]
    source: str | None = option(None, accepts=SOURCE, about=_SOURCE_ABOUT)
    n_neighbors: PositiveInt | Grid[PositiveInt] = option(
        [1, 3, 5, 10], accepts="a positive integer or a list of them",
        about="k; a list is a grid for cross-validation (values above the smallest fold's size are dropped with "
              "a warning; a head with none left is refused)")


class PcaFusionHead(WeightedOptions, TrustOptions, HeadOptions):
    """Several sources fused by PCA, then logistic regression."""

    type: Literal["pca_fusion"]
    fuses: ClassVar[bool] = True
    sources: list[str] | None = option(
        None, accepts=f"a list of {SOURCE}",
        about="the features it fuses (default: every backbone of features.backbones at its default layer)")
    components: PositiveInt = option(128, accepts="a positive integer",
                                     about="PCA components per source (or in all, with concat_then_pca)")
    order: Literal["pca_then_concat", "concat_then_pca"] = option(
        "pca_then_concat", accepts="pca_then_concat or concat_then_pca",
        about="reduce each source, then concatenate; or concatenate, then reduce")
    variance_threshold: NonNegativeFinite | None = option(
        None, accepts="a finite number >= 0, or null", about="drop components whose variance is at most this")
    select_k: PositiveInt | None = option(None, accepts="a positive integer, or null",
                                          about="keep the k components that best separate the classes (ANOVA F)")
    C: PositiveFinite | Grid[PositiveFinite] = option(
        [0.01, 0.1, 1.0], accepts="a finite positive number or a list of them",
        about="inverse regularisation strength; a list is a grid for cross-validation")


class ZeroShotHead(HeadOptions):
    """CLIP zero-shot classification: prompts made of the class folder names, embedded by the text tower of
    the source's CLIP backbone; no training image is used."""

    type: Literal["zero_shot"]
    source: str | None = option(None, accepts=SOURCE, about=_SOURCE_ABOUT + "; a CLIP backbone's embedding layer")
    templates: Annotated[list[Template], Field(min_length=1)] = option(
        list(DEFAULT_TEMPLATES), accepts="a list of texts, each with one {} and no other braces",
        about="the prompts of each class, {} standing for its words; the class embedding is the mean of their "
              "normalised embeddings (default: CLIP's 7-template ImageNet ensemble)")
    class_prompts: dict[str, str] = option(
        {}, accepts="a mapping of class folder name to words",
        about="the words that stand for a class in its prompts (default: its folder name, '_' and '-' as spaces)")
    # It learns nothing from the training images, so it has nothing to recalibrate on; reject needs none
    calibration: Literal["none"] = option(
        "none", accepts="none (a zero_shot head learns nothing from the training images)",
        about="its probabilities are CLIP's softmax over the prompts' similarities, never recalibrated")
    reject: RejectOptions | None = reject_option()


HEAD_MODELS: tuple[type[HeadOptions], ...] = (LogisticRegressionHead, SvmHead, KnnHead, PcaFusionHead, ZeroShotHead)
AnyHead = Annotated[Union[LogisticRegressionHead, SvmHead, KnnHead, PcaFusionHead, ZeroShotHead],  # noqa: UP007
                    Discriminator("type")]
HEAD_TYPES: dict[str, type[HeadOptions]] = {get_args(m.model_fields["type"].annotation)[0]: m for m in HEAD_MODELS}
# type -> its options' defaults (`source`/`sources` among them), from the models above.
HEAD_OPTIONS: dict[str, dict[str, Any]] = {
    name: {key: f.default for key, f in model.model_fields.items() if key not in ("name", "type")}
    for name, model in HEAD_TYPES.items()}


@dataclass
class HeadSpec:
    """One head as it is fitted: a name, a type, its resolved feature sources and its options."""

    name: str
    type: str
    sources: list[str]
    options: dict = field(default_factory=dict)
