"""A scikit-learn transformer over image paths, backed by the feature cache.

`make_pipeline(FeatureExtractor(), LogisticRegression())` fits on a list of file paths; images the
cache already holds are not run through the network again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from pipeline.core.errors import DataError
from pipeline.features.extract import DEFAULT_BACKBONE, extract, resolve_device, resolve_precision
from pipeline.features.settings import DEFAULTS
from pipeline.images.data import Dataset
from pipeline.models.registry import get_spec


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Image paths -> pooled features of a frozen backbone, one row per path."""

    def __init__(self, backbone: str = DEFAULT_BACKBONE, layer: str | None = None,
                 cache_dir: str = DEFAULTS.cache_dir, device: str = DEFAULTS.device,
                 precision: str = DEFAULTS.precision, batch_size: int = DEFAULTS.batch_size,
                 scheduler: str | None = DEFAULTS.scheduler, progress: bool = False,
                 runtime: str = DEFAULTS.runtime) -> None:
        self.backbone = backbone
        self.layer = layer
        self.cache_dir = cache_dir
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.scheduler = scheduler
        self.progress = progress
        self.runtime = runtime

    def fit(self, X: object = None, y: object = None) -> FeatureExtractor:
        """Nothing is learned (the backbone is frozen); this validates the settings up front."""
        spec = get_spec(self.backbone)
        self.backbone_ = self.backbone
        self.layer_ = spec.layer(self.layer)
        self.n_features_out_ = spec.layers[self.layer_].dim
        # The precision is part of the cache key, so it is fixed here; the device is chosen again
        # at transform time, so a fitted pipeline moves between GPU and CPU machines (and so is the
        # runtime: `auto` is OpenVINO on a CPU, torch on CUDA).
        self.precision_ = resolve_precision(self.precision, resolve_device(self.device))
        return self

    def transform(self, X: object) -> np.ndarray:
        check_is_fitted(self, "layer_")
        if isinstance(X, str | Path) or np.ndim(X) != 1:
            raise DataError("FeatureExtractor.transform expects a 1-D list of image paths")
        paths = [Path(p) for p in X]
        dataset = Dataset(paths, np.full(len(paths), -1), [], [])
        report = extract(dataset, [self.backbone_], [f"{self.backbone_}:{self.layer_}"], self.cache_dir,
                         self.device, self.precision_, self.batch_size, scheduler=self.scheduler,
                         progress=self.progress, runtime=self.runtime)
        if report.skipped:
            path, reason = report.skipped[0]
            raise DataError(f"cannot embed {len(report.skipped)} of {len(paths)} files "
                            f"(first: {path}: {reason}); a transformer must return one row per input")
        return report.feature_sets[(self.backbone_, self.layer_)].features.compute()

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self, "layer_")
        return np.asarray([f"{self.backbone_}_{self.layer_}_{i}" for i in range(self.n_features_out_)],
                          dtype=object)
