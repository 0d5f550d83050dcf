"""Transfer learning for image classification: frozen pretrained CNN features, cached, reused.

`extract` embeds image folders into a sharded on-disk cache; `FeatureExtractor` does the same as a
scikit-learn transformer over file paths. The names below load on first use (PEP 562), so importing
the package, or starting the `pipeline` command, costs no torch, scikit-learn or Dask import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import BackboneError, CacheError, ConfigError, DataError, PipelineError

if TYPE_CHECKING:
    from pipeline.features.extract import ExtractReport, FeatureSet, extract
    from pipeline.features.transformer import FeatureExtractor

__version__ = "0.1.0"
_LAZY = {"extract": "pipeline.features.extract", "ExtractReport": "pipeline.features.extract",
         "FeatureSet": "pipeline.features.extract", "FeatureExtractor": "pipeline.features.transformer"}
__all__ = ["BackboneError", "CacheError", "ConfigError", "DataError", "ExtractReport", "FeatureExtractor",
           "FeatureSet", "PipelineError", "extract"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
