"""The cached features of a shared photo set's train and test folders, for the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.features.extract import extract
from pipeline.features.settings import DEFAULTS


def set_features(data: str | Path, name: str, backbone: str, cache: str | Path, layer: str = "head",
                 runtime: str = DEFAULTS.runtime,
                 splits: tuple[str, ...] = ("train", "test")) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (X, y)} of `data/name` (its train and test folders by default), extracted into (or read
    from) `cache` by `runtime` (part of the cache key)."""
    out = {}
    for split in splits:
        fs = extract(Path(data) / name / split, [backbone], [layer], cache_dir=cache, progress=False,
                     runtime=runtime).feature_sets[(backbone, layer)]
        out[split] = (fs.features.compute(), fs.labels)
    return out
