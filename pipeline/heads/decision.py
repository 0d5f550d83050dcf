"""From a head's probabilities to its answer: the class on top, or the second of two classes above a
tuned threshold, or `unknown` when the top probability is below the head's reject threshold (with the
top class and its probability still given beside it).

`decide` is the one place that makes this decision; `pipeline run`, `predict`, `batch` and a server
(`HeadBundle.decide(proba)` on a loaded head) all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.heads.trust_options import UNKNOWN


class DecisionRule(BaseModel):
    """What a fitted head decides with, saved in its bundle's head.json: `binary_threshold` on the second
    class's probability (two-class heads with tune_threshold; None: the class on top), and
    `reject_threshold` under which the answer is unknown (None: always a class)."""

    model_config = ConfigDict(extra="forbid")

    binary_threshold: float | None = None
    reject_threshold: float | None = None
    reject_coverage: float | None = None  # the training coverage the threshold was set for, when given so


@dataclass
class Decisions:
    """Per row: the class index chosen (never unknown), its probability, and whether the answer is unknown
    (the top probability below the reject threshold)."""

    label: np.ndarray
    top_probability: np.ndarray
    unknown: np.ndarray

    def answers(self, classes: list[str]) -> list[str]:
        """Each row's answer: its class name, or unknown."""
        return [UNKNOWN if u else classes[i] for i, u in zip(self.label, self.unknown, strict=True)]


def decide(rule: DecisionRule, proba: np.ndarray) -> Decisions:
    """The decisions for probabilities whose columns are the head's classes, in order."""
    if not len(proba):
        empty = np.zeros(0)
        return Decisions(empty.astype(int), empty, empty.astype(bool))
    label = proba.argmax(axis=1)
    if rule.binary_threshold is not None and proba.shape[1] == 2:
        label = (proba[:, 1] >= rule.binary_threshold).astype(int)
    top = proba.max(axis=1)
    unknown = top < rule.reject_threshold if rule.reject_threshold is not None else np.zeros(len(proba), bool)
    return Decisions(label, proba[np.arange(len(proba)), label], unknown)


def answer_columns(rule: DecisionRule) -> list[str]:
    """The answer's CSV columns: predicted_class, and with a reject threshold the top class and its
    probability beside it (what the head would have said)."""
    return ["predicted_class", *(["top_class", "top_probability"] if rule.reject_threshold is not None else [])]


def answer_cells(rule: DecisionRule, decisions: Decisions, classes: list[str]) -> list[list[str]]:
    """Each row's cells for `answer_columns`."""
    answers = decisions.answers(classes)
    if rule.reject_threshold is None:
        return [[answer] for answer in answers]
    return [[answer, classes[label], f"{p:.6f}"]
            for answer, label, p in zip(answers, decisions.label, decisions.top_probability, strict=True)]
