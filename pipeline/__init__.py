"""Transfer learning for image classification: frozen pretrained CNN features, cached, reused.

Stage 1 (this package's foundation): `extract` embeds image folders into a sharded zarr cache;
`FeatureExtractor` does the same as a scikit-learn transformer over file paths. Both are imported on
first use, so that the command line (whose parser needs only the light settings modules) starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import BackboneError, CacheError, ConfigError, DataError, PipelineError

if TYPE_CHECKING:
    from pipeline.features.extract import ExtractReport, FeatureSet, extract
    from pipeline.features.transformer import FeatureExtractor

_LAZY = {"extract": "pipeline.features.extract", "ExtractReport": "pipeline.features.extract",
         "FeatureSet": "pipeline.features.extract", "FeatureExtractor": "pipeline.features.transformer"}

__version__ = "0.1.0"
__all__ = ["BackboneError", "CacheError", "ConfigError", "DataError", "ExtractReport", "FeatureExtractor",
           "FeatureSet", "PipelineError", "extract"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
