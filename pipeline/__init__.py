"""Transfer learning for image classification: frozen pretrained CNN features, cached, reused.

Stage 1 (this package's foundation): `extract` embeds image folders into a sharded zarr cache;
`FeatureExtractor` does the same as a scikit-learn transformer over file paths.
"""

from pipeline.core.errors import BackboneError, CacheError, ConfigError, DataError, PipelineError
from pipeline.features.extract import ExtractReport, FeatureSet, extract
from pipeline.features.transformer import FeatureExtractor

__version__ = "0.1.0"
__all__ = ["BackboneError", "CacheError", "ConfigError", "DataError", "ExtractReport", "FeatureExtractor",
           "FeatureSet", "PipelineError", "extract"]
