"""Head sources (`BACKBONE:LAYER`) over the feature sets an extraction returns: their matrices, and what
a saved head records to make its features again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.features.cache import FeatureStore
from pipeline.features.extract import FeatureSet


class SourceMeta(BaseModel):
    """One source of a saved head: what makes its features again, checked against the cache key."""

    model_config = ConfigDict(extra="forbid", strict=True)

    backbone: str
    layer: str
    cache_key: str
    precision: str
    weights_sha256: str
    weights: str | None = None  # a custom weights file (absolute), if the features were made with one
    runtime: str = "torch"  # what ran the network (heads saved before there was a choice: torch)


def feature_set(sets: dict[tuple[str, str], FeatureSet], source: str) -> FeatureSet:
    """The feature set of a head source written BACKBONE:LAYER."""
    backbone, layer = source.split(":")
    return sets[(backbone, layer)]


def matrix(sets: dict[tuple[str, str], FeatureSet], sources: list[str]) -> tuple[np.ndarray, list[int]]:
    blocks = [feature_set(sets, s).features.compute() for s in sources]
    return np.hstack(blocks), [b.shape[1] for b in blocks]


def source_meta(sets: dict[tuple[str, str], FeatureSet], sources: list[str], cache_dir: Path,
                weights: str | None = None) -> list[SourceMeta]:
    """What a saved head needs to make its features again; `weights` is a custom weights file, if any."""
    out = []
    for source in sources:
        fs = feature_set(sets, source)
        meta = FeatureStore(cache_dir / fs.cache_key).meta
        out.append(SourceMeta(backbone=fs.backbone, layer=fs.layer, cache_key=fs.cache_key,
                              precision=meta["precision"], runtime=meta.get("runtime", "torch"),
                              weights_sha256=meta["weights_sha256"],
                              weights=str(Path(weights).absolute()) if weights else None))
    return out
