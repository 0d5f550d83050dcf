"""Re-drawn train/test splits of a dataset, as folders of symlinks, for benchmarks.

A test split of 240 images moves accuracy in steps of 0.42%, and one split's hard images can put a
method a step below or above a target. Re-drawing the split (same size per class, seeded) and
averaging says how much of a figure is the method and how much is the split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit

from pipeline.images.data import scan


def pooled(root: Path, parts: tuple[str, ...] = ("train", "test")) -> tuple[list[Path], np.ndarray, list[str]]:
    """Every image of root/train and root/test (or of the parts named) with its label, in that order."""
    sets = [scan(root / part) for part in parts]
    assert all(s.class_names == sets[0].class_names for s in sets), f"{parts} name different classes"
    return [p for s in sets for p in s.paths], np.concatenate([s.labels for s in sets]), sets[0].class_names


def resampled_indices(labels: np.ndarray, test_size: int, count: int, seed: int = 1) -> list[tuple]:
    """`count` stratified (train, test) index splits with `test_size` test images each."""
    return list(StratifiedShuffleSplit(count, test_size=test_size, random_state=seed).split(labels, labels))


def write_split(paths: list[Path], labels: np.ndarray, classes: list[str], split: tuple, folder: Path) -> Path:
    """folder/train/CLASS/... and folder/test/CLASS/... as symlinks to the original files."""
    for part, rows in zip(("train", "test"), split, strict=True):
        for row in rows:
            link = folder / part / classes[labels[row]] / f"{row:05d}{paths[row].suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(paths[row].absolute())
    return folder
