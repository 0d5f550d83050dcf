"""The typed options that make a head's answers trustworthy, shared by the head types of
`pipeline.heads.spec`: calibration of its probabilities, an `unknown` answer below a confidence
(reject), class weights for imbalanced folders and a tuned decision threshold for two classes.

No scikit-learn here (the command line reads these models when it builds its parser).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pipeline.core.schema import Section, one_of, option, problem

CALIBRATIONS = ("none", "sigmoid", "isotonic", "temperature")
# Chosen by benchmarks/calibration.py (benchmarks/RESULTS.md, "Calibration"), by cross-validation inside the
# training folders of flowers12, dtd10 and intel6 with the Lite0/1/2 features: for logistic regression and the
# PCA fusion the lowest mean log-loss and ECE. kNN and the SVM (sigmoid both) have their own defaults in
# pipeline.heads.spec.
DEFAULT_CALIBRATION = "temperature"
UNKNOWN = "unknown"  # the answer below a head's reject threshold: no class folder may be named so
OpenFraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
_OPEN = "a number between 0 and 1 (both excluded)"


class RejectOptions(Section):
    """`reject:` answer `unknown` when the head's top probability is below a threshold: the threshold
    itself, or the share of the training images to keep (coverage), turned into a threshold on
    cross-validated probabilities of the training folder."""

    threshold: OpenFraction | None = option(
        None, accepts=_OPEN, about="answer unknown when the top probability is below this")
    coverage: OpenFraction | None = option(
        None, accepts=_OPEN,
        about="the share of (cross-validated) training images to answer; the threshold follows from it")

    @model_validator(mode="after")
    def _one(self) -> RejectOptions:
        if (self.threshold is None) == (self.coverage is None):
            raise problem("give exactly one of threshold or coverage (e.g. threshold: 0.5, or coverage: 0.95)")
        return self


def calibration_option(default: str) -> Any:
    return option(default, accepts=one_of(CALIBRATIONS),
                  about="recalibrate the probabilities on cross-validated predictions of the training folder: "
                        "Platt (sigmoid), isotonic regression, one temperature for all classes, or none")


def reject_option() -> Any:
    return option(None, accepts="{threshold: P} or {coverage: C}, each between 0 and 1",
                  about=f"answer {UNKNOWN!r} (with the top class and probability beside it) below a top probability")


class TrustOptions(Section):
    """Calibration, reject and the two-class threshold: for every head fitted on labelled features."""

    calibration: Literal[CALIBRATIONS] = calibration_option(DEFAULT_CALIBRATION)  # type: ignore[valid-type]
    reject: RejectOptions | None = reject_option()
    tune_threshold: bool = option(
        False, accepts="true or false",
        about="two-class heads: the decision threshold on the second class's probability that maximises "
              "cross-validated balanced accuracy, instead of 0.5")


class WeightedOptions(Section):
    """Class weights, for the head types whose estimator takes them."""

    class_weight: Literal["balanced"] | None = option(
        None, accepts="balanced or null",
        about="weigh each class inversely to its training images (for imbalanced folders)")
