"""Zero-shot heads: a CLIP text tower turns each class folder's name into prompts, and their embeddings
classify the images' CLIP embeddings with no training image.

- `ZeroShotClassifier`: softmax(logit_scale * cos(image, class)) over the class embeddings (CLIP's
  zero-shot classifier). The class-embedding matrix and the scale are plain arrays and numbers in the
  saved head; the text tower is not saved, and prediction never needs it.
- `ZeroShotBlend`: few shots on top of it (the `zero_shot_prior` of a logistic_regression head): a logistic
  regression on the standardised embeddings pooled with the zero-shot classifier in log space,
  log p = (1 - weight) log p_regression + weight log p_zero_shot + const, `weight` and C chosen by
  cross-validation like any grid. (An L2-regularised logistic regression is convex: starting it from the
  zero-shot weights would change how fast it converges, never where, so the prior is a blend.)
- `prior_for`: the zero-shot classifier a head needs, embedded once from the class names; None for a head
  that needs none.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.core.errors import ConfigError
from pipeline.heads.spec import DEFAULT_TEMPLATES, HeadSpec


class ZeroShotClassifier(ClassifierMixin, BaseEstimator):
    """CLIP's zero-shot classifier on (CLIP image) embeddings: one unit-length row of `class_embeddings`
    per class, in the order of the class labels 0..n-1, and the model's `logit_scale`."""

    def __init__(self, class_embeddings: np.ndarray | None = None, logit_scale: float = 100.0) -> None:
        self.class_embeddings = class_embeddings
        self.logit_scale = logit_scale

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> ZeroShotClassifier:
        """Nothing is learned: checks the features' width and sets `classes_` to the class labels."""
        self._check(X)
        self.classes_ = np.arange(len(self.class_embeddings))
        return self

    def _check(self, X: np.ndarray) -> None:
        if np.ndim(X) != 2 or X.shape[1] != self.class_embeddings.shape[1]:
            raise ValueError(f"features of width {np.shape(X)[-1]} do not match the {self.class_embeddings.shape[1]}"
                             "-wide class embeddings (a zero_shot head reads its CLIP backbone's embedding layer)")

    def logits(self, X: np.ndarray) -> np.ndarray:
        """logit_scale times the cosine similarity of each row with each class embedding."""
        self._check(X)
        X = np.asarray(X, dtype=np.float64)
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return self.logit_scale * X @ np.asarray(self.class_embeddings, dtype=np.float64).T

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.logits(X), axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.logits(X).argmax(1)]


class ZeroShotBlend(ClassifierMixin, BaseEstimator):
    """A logistic regression (standardised features, inverse regularisation `C`) pooled in log space with
    a zero-shot classifier: `weight` 0 is the regression alone, 1 the zero-shot classifier alone."""

    def __init__(self, zero_shot: ZeroShotClassifier | None = None, C: float = 1.0, weight: float = 0.5) -> None:
        self.zero_shot = zero_shot
        self.C = C
        self.weight = weight

    def fit(self, X: np.ndarray, y: np.ndarray) -> ZeroShotBlend:
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        from pipeline.heads.fit import logistic_regression  # fit.py builds this class: imported when used

        self.zero_shot._check(X)
        self.regression_ = Pipeline([("scale", StandardScaler()), ("clf", logistic_regression(self.C))]).fit(X, y)
        self.classes_ = np.arange(len(self.zero_shot.class_embeddings))
        if not np.array_equal(self.regression_.classes_, self.classes_):
            raise ValueError("a zero-shot prior needs training images in every class")
        return self

    def predict_log_proba(self, X: np.ndarray) -> np.ndarray:
        pooled = ((1 - self.weight) * self.regression_.predict_log_proba(X)
                  + self.weight * log_softmax(self.zero_shot.logits(X), axis=1))
        return log_softmax(pooled, axis=1)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_log_proba(X).argmax(1)]


def needs_prior(spec: HeadSpec) -> bool:
    """Whether the head classifies with a zero-shot classifier (a zero_shot head, or a logistic regression
    with a zero_shot_prior)."""
    return spec.type == "zero_shot" or (spec.type == "logistic_regression"
                                        and spec.options.get("zero_shot_prior") is not None)


def check_source(spec: HeadSpec) -> None:
    """A head that needs a zero-shot classifier reads one CLIP backbone's embedding layer; refused otherwise,
    before any feature is extracted."""
    if not needs_prior(spec):
        return
    from pipeline.models.openclip import EMBEDDING, clip_backbones, clip_model

    (source,) = spec.sources
    backbone, _, layer = source.partition(":")
    what = "a zero_shot head" if spec.type == "zero_shot" else "a zero_shot_prior"
    if clip_model(backbone) is None or layer != EMBEDDING:
        raise ConfigError(f"head {spec.name!r}: {what} reads a CLIP backbone's {EMBEDDING} layer, not {source} "
                          f"(CLIP backbones: {', '.join(clip_backbones())})")


def prompts(class_names: list[str], templates: list[str], class_prompts: dict[str, str]) -> list[list[str]]:
    """Each class's prompts: every template with the class's words (`class_prompts`, else its folder name
    with '_' and '-' as spaces)."""
    unknown = sorted(set(class_prompts) - set(class_names))
    if unknown:
        raise ConfigError(f"class_prompts names classes that are not class folders: {', '.join(unknown)}")
    words = [class_prompts.get(name) or name.replace("_", " ").replace("-", " ").strip() for name in class_names]
    return [[template.replace("{}", word) for template in templates] for word in words]


def prior_for(spec: HeadSpec, class_names: list[str],
              weights: str | os.PathLike | None = None) -> ZeroShotClassifier | None:
    """The zero-shot classifier `spec` needs (None when it needs none), from the text tower of its CLIP
    backbone; `weights` is the backbone's weights file when one was given (--weights)."""
    if not needs_prior(spec):
        return None
    from pipeline.models.openclip import text_embeddings

    check_source(spec)
    texts = prompts(class_names, spec.options.get("templates") or list(DEFAULT_TEMPLATES),
                    spec.options.get("class_prompts") or {})
    embeddings, scale = text_embeddings(spec.sources[0].partition(":")[0], texts, weights)
    return ZeroShotClassifier(embeddings, scale)
