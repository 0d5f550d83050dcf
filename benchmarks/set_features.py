"""The cached features of a shared photo set's train and test folders, for the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.features.extract import extract


def set_features(data: str | Path, name: str, backbone: str, cache: str | Path,
                 layer: str = "head") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (X, y), "test": (X, y)} of `data/name`, extracted into (or read from) `cache`."""
    out = {}
    for split in ("train", "test"):
        fs = extract(Path(data) / name / split, [backbone], [layer], cache_dir=cache,
                     progress=False).feature_sets[(backbone, layer)]
        out[split] = (fs.features.compute(), fs.labels)
    return out
