"""Transfer learning for image classification: frozen pretrained CNN features, cached, reused.

Stage 1 (this package's foundation): `extract` embeds image folders into a sharded zarr cache;
`FeatureExtractor` does the same as a scikit-learn transformer over file paths.

Those two (and `ExtractReport`, `FeatureSet`) are imported on first use, so importing a light
submodule (`pipeline.models.registry`, `pipeline.core.errors`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipeline.core.errors import BackboneError, CacheError, ConfigError, DataError, PipelineError

if TYPE_CHECKING:
    from pipeline.features.extract import ExtractReport, FeatureSet, extract
    from pipeline.features.transformer import FeatureExtractor

__version__ = "0.1.0"
__all__ = ["BackboneError", "CacheError", "ConfigError", "DataError", "ExtractReport", "FeatureExtractor",
           "FeatureSet", "PipelineError", "extract"]

_LAZY = {"extract": "pipeline.features.extract", "ExtractReport": "pipeline.features.extract",
         "FeatureSet": "pipeline.features.extract", "FeatureExtractor": "pipeline.features.transformer"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
